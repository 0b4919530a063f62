"""Video evaluation: dual encoders (retrieval, zero-shot classification) and the temporal table with its controls
for dual encoders and LLaVA video models.

A clip's frames go through the image tower one by one; `CLIP.pool_frames` makes the video embedding (meanP or
seqTransf, CLIP4Clip's names). `vlmkit eval retrieval` and `vlmkit eval zeroshot` come here when their data is
video (a manifest with a `video` column, a folder of class subfolders of video files).

The temporal table asks questions whose answers live in time (the moving-shapes rows carry `answer`,
`reversed_answer`, `choices`; a dual encoder picks the closest of the row's `choice_captions` (`evaluate_temporal`),
a LLaVA model generates its answer (`evaluate_video_qa`)). Beside the model as it is, in the same table:

    mean pool       order thrown away: the mean of the frame embeddings (meanP); for LLaVA every frame's tokens
                    replaced by the clip's mean
    single frame    the clip's middle frame held for the whole clip (a still)
    shuffled        the sampled frames in a random order (seeded)
    reversed        the clip played backwards, scored against the flipped answer: a model that reads time flips
                    its answer with the clip, so this row is high when the first is
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from vlmkit.data.transforms import ImageTransform
from vlmkit.data.video import (
    VIDEO_EXTENSIONS,
    VideoClips,
    VideoDecodeError,
    frames_tensor,
    read_clip,
)
from vlmkit.errors import ConfigError, DataError
from vlmkit.eval.features import _autocast, eval_mode, extract_text_features, result_dict

CONTROLS = ("model", "mean pool", "single frame", "shuffled", "reversed")


@torch.no_grad()
def frame_features(
    model, clips: Sequence[torch.Tensor], batch_size: int = 16, device="cpu", bf16: bool = False
) -> torch.Tensor:
    """Transformed clips (each (T, 3, S, S), one T for all) -> frame embeddings (N, T, D), float32 on the CPU,
    not normalised (`pool_frames` does that)."""
    out = []
    with eval_mode(model):
        for i in range(0, len(clips), batch_size):
            batch = torch.stack(list(clips[i : i + batch_size])).to(device)  # (B, T, 3, S, S)
            B, T = batch.shape[:2]
            with _autocast(device, bf16):
                x = model.encode_image(batch.flatten(0, 1))  # (B*T, D)
            out.append(x.float().view(B, T, -1).cpu())
    return torch.cat(out)


@torch.no_grad()
def pool(model, frames: torch.Tensor, pool: str | None = None) -> torch.Tensor:
    """Frame embeddings (N, T, D) -> normalised video embeddings (N, D) with the model's pooling or `pool`."""
    with eval_mode(model):
        device = next(model.parameters()).device
        return model.pool_frames(frames.to(device), normalize=True, pool=pool).float().cpu()


def _require_video_model(model) -> None:
    if not hasattr(model, "pool_frames"):
        raise ConfigError(f"{type(model).__name__} does not embed video; use a CLIP/SigLIP dual encoder")


def is_video_folder(root: str | Path) -> bool:
    """Whether a class-folder tree holds video files (and no images)."""
    root = Path(root)
    if not root.is_dir():
        return False
    for p in root.rglob("*"):
        if p.suffix.lower() in VIDEO_EXTENSIONS:
            return True
    return False


def evaluate_video_retrieval(model, tokenizer, preprocess_cfg, data, num_frames: int = 8, batch_size: int = 16,
                             device="cpu", model_name: str = "", bf16: bool = False) -> dict:  # fmt: skip
    """Text-to-video and video-to-text recall@k over a video manifest or shards; rows naming the same video are
    one video with several captions; bad videos are skipped and counted (`num_skipped`)."""
    from vlmkit.eval.retrieval import retrieval_metrics

    _require_video_model(model)
    ds = VideoClips(
        data, ImageTransform(preprocess_cfg, train=False), num_frames, max_bad_fraction=1.0, progress=True
    )
    index: dict[str, int] = {}
    video_of, clips = [], []
    for i, s in enumerate(ds.samples):
        key = str(s.video) if not isinstance(s.video, bytes) else s.where
        if key not in index:
            index[key] = len(index)
            clips.append(ds[i][0])
        video_of.append(index[key])
    video = pool(model, frame_features(model, clips, batch_size, device, bf16))  # (Nv, D)
    text = extract_text_features(model, tokenizer, ds.captions, device=device, bf16=bf16)  # (Nt, D)
    metrics = retrieval_metrics(video, text, torch.tensor(video_of))
    metrics = {k.replace("image_retrieval", "video_retrieval"): v for k, v in metrics.items()}
    metrics.update(num_videos=len(clips), num_captions=len(ds.captions), num_skipped=len(ds.bad_rows),
                   num_frames=num_frames, pool=model.cfg.video.pool)  # fmt: skip
    return result_dict("zeroshot_video_retrieval", Path(str(data)).stem, model_name, metrics)


def evaluate_video_zeroshot(model, tokenizer, preprocess_cfg, root, templates: Sequence[str], classes_file=None,
                            positional_classes: bool = False, num_frames: int = 8, batch_size: int = 16,
                            device="cpu", model_name: str = "", bf16: bool = False,
                            out_dir: str | Path | None = None) -> dict:  # fmt: skip
    """Zero-shot classification of a class-per-folder tree of video files (bad files skipped and counted)."""
    from vlmkit.data.manifest import read_image_folder
    from vlmkit.eval.zeroshot import (
        build_zeroshot_classifier,
        classification_metrics,
        confusion_matrix,
        plot_confusion_matrix,
        zeroshot_logits,
    )

    _require_video_model(model)
    paths, labels, classnames = read_image_folder(root, classes_file, positional_classes, VIDEO_EXTENSIONS)
    if not paths:
        raise DataError(
            f"{root}: no video files ({', '.join(sorted(VIDEO_EXTENSIONS))}) in its class folders"
        )
    transform = ImageTransform(preprocess_cfg, train=False)
    clips, kept, skipped = [], [], []
    for i, p in enumerate(paths):
        try:
            clips.append(frames_tensor(read_clip(p, num_frames).frames, transform))
            kept.append(i)
        except VideoDecodeError as e:
            skipped.append(f"{p}: {e.reason}")
    if not clips:
        raise DataError(f"{root}: none of its {len(paths)} videos could be decoded ({skipped[0]})")
    video = pool(model, frame_features(model, clips, batch_size, device, bf16))
    classifier = build_zeroshot_classifier(model, tokenizer, classnames, templates, device=device, bf16=bf16)
    logits = zeroshot_logits(video, classifier)
    y = torch.tensor([labels[i] for i in kept])
    metrics = classification_metrics(logits, y, classnames)
    metrics.update(num_skipped=len(skipped), num_frames=num_frames, pool=model.cfg.video.pool)
    if out_dir is not None:
        confusion = confusion_matrix(logits.argmax(dim=1), y, len(classnames))
        plot_confusion_matrix(confusion, classnames, Path(out_dir) / "confusion_matrix.png")
    return result_dict("zeroshot_video_classification", Path(root).resolve().name, model_name, metrics)


# ------------------------------------------------------------------------------------------ the temporal table


def read_temporal_rows(path: str | Path) -> list[dict]:
    """Rows with `video`, `choices`, `choice_captions`, `answer` (and `kind`, `reversed_answer`); paths resolved."""
    from vlmkit.data.manifest import read_jsonl

    rows = []
    for line, row in read_jsonl(
        path, "a JSONL of multiple-choice video rows, as `vlmkit data synth-video` writes"
    ):
        missing = [k for k in ("video", "choices", "choice_captions", "answer") if k not in row]
        if missing:
            raise DataError(f"{path}:{line}: missing key {missing[0]!r} (multiple-choice rows need video, choices, "
                            "choice_captions, answer)")  # fmt: skip
        if len(row["choices"]) != len(row["choice_captions"]) or row["answer"] not in row["choices"]:
            raise DataError(f"{path}:{line}: 'choices' and 'choice_captions' must align and hold the answer")
        rows.append({**row, "video": Path(path).parent / row["video"], "line": line})
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def temporal_clips(rows: list[dict], transform, num_frames: int, seed: int = 0) -> dict:
    """The clips of each control, transformed, each (T, 3, S, S): {"model", "single frame" (the clip's middle frame
    held for all T frames: a still), "shuffled" (seeded), "reversed"} plus "kept" (row indices) and "skipped"."""
    out = defaultdict(list)
    rng = np.random.default_rng(seed)
    for i, row in enumerate(rows):
        try:
            clip = read_clip(row["video"], num_frames)
            middle = read_clip(row["video"], 1)
        except VideoDecodeError as e:
            out["skipped"].append(f"{row['video']}: {e.reason}")
            continue
        x = frames_tensor(clip.frames, transform)  # (T, 3, S, S)
        out["kept"].append(i)
        out["model"].append(x)
        out["single frame"].append(frames_tensor(middle.frames, transform).expand_as(x).clone())
        out["shuffled"].append(x[torch.from_numpy(rng.permutation(len(x)))])
        out["reversed"].append(x.flip(0))
    return out


def _kind(row: dict) -> str:
    return row.get("kind", row.get("type", "all"))


def _accuracy_by_kind(rows, kept, predictions, key: str = "answer") -> dict[str, float]:
    hits = defaultdict(list)
    for i, pred in zip(kept, predictions):
        target = rows[i].get(key)
        if target is None:
            continue
        hits[_kind(rows[i])].append(str(pred).strip().lower() == str(target).strip().lower())
    return {k: float(np.mean(v)) for k, v in sorted(hits.items())}


def temporal_table(rows: list[dict], clips: dict, answer, own: str, model_name: str, data) -> dict:
    """The table: `answer(clips, pool)` -> one answer per kept row, `pool` None (the model as it is) or "mean"."""
    kept = clips["kept"]
    if not kept:
        raise DataError(f"{data}: no decodable videos ({clips['skipped'][0]})")
    table = {
        "model": _accuracy_by_kind(rows, kept, answer(clips["model"], None)),
        "mean pool": _accuracy_by_kind(rows, kept, answer(clips["model"], "mean")),
        "single frame": _accuracy_by_kind(rows, kept, answer(clips["single frame"], None)),
        "shuffled": _accuracy_by_kind(rows, kept, answer(clips["shuffled"], None)),
        "reversed": _accuracy_by_kind(rows, kept, answer(clips["reversed"], None), "reversed_answer"),
    }
    chance = {}
    for i in kept:
        choices = rows[i].get("choices")
        if choices:
            chance.setdefault(_kind(rows[i]), 1.0 / len(choices))
    metrics = {"table": table, "chance": dict(sorted(chance.items())), "pool": own, "num_videos": len(kept),
               "num_skipped": len(clips["skipped"]), "num_frames": len(clips["model"][0])}  # fmt: skip
    return result_dict("video_temporal", Path(str(data)).stem, model_name, metrics)


@torch.no_grad()
def evaluate_temporal(model, tokenizer, preprocess_cfg, data, num_frames: int = 8, batch_size: int = 16,
                      device="cpu", model_name: str = "", bf16: bool = False, seed: int = 0,
                      out_dir: str | Path | None = None) -> dict:  # fmt: skip
    """Dual encoders: multiple-choice accuracy per kind of question for the model and each control (module
    docstring); the answer is the choice whose caption is closest to the clip."""
    _require_video_model(model)
    rows = read_temporal_rows(data)
    clips = temporal_clips(rows, ImageTransform(preprocess_cfg, train=False), num_frames, seed)
    kept = clips["kept"]
    captions = [c for i in kept for c in rows[i]["choice_captions"]]
    text = extract_text_features(model, tokenizer, captions, device=device, bf16=bf16)  # (sum of choices, D)
    starts = np.cumsum([0] + [len(rows[i]["choices"]) for i in kept])

    def answer(batch: list[torch.Tensor], how: str | None) -> list[str]:
        video = pool(model, frame_features(model, batch, batch_size, device, bf16), how)
        return [rows[i]["choices"][int((text[starts[j] : starts[j + 1]] @ video[j]).argmax())]
                for j, i in enumerate(kept)]  # fmt: skip

    result = temporal_table(rows, clips, answer, model.cfg.video.pool, model_name, data)
    if out_dir is not None:
        write_temporal_report(result, Path(out_dir))
    return result


def read_video_questions(path: str | Path) -> list[dict]:
    """Video question rows (`vlmkit data synth-video`'s vqa/*.jsonl): video, the question (the human turn, without
    `<video>`), answer; `reversed_answer`, `choices` and `type` when present."""
    from vlmkit.data.chat import VIDEO_TOKEN
    from vlmkit.data.vqa import read_conversations

    rows = []
    for row in read_conversations(path):
        if "video" not in row:
            raise DataError(f"{path}:{row['line']}: not a video row (needs 'video' and a <video> turn)")
        turns = row["conversations"]
        question = next(
            t.get("value", t.get("content"))
            for t in turns
            if t.get("from", t.get("role")) in ("human", "user")
        )
        answer = row.get("answer") or next(t.get("value", t.get("content")) for t in turns
                                           if t.get("from", t.get("role")) in ("gpt", "assistant"))  # fmt: skip
        rows.append({**row, "question": question.replace(VIDEO_TOKEN, "").strip(), "answer": answer})
    return rows


@torch.no_grad()
def evaluate_video_qa(pipe, data, num_frames: int = 8, batch_size: int = 32, limit: int | None = None,
                      model_name: str = "", seed: int = 0, out_dir: str | Path | None = None,
                      controls: bool = True) -> dict:  # fmt: skip
    """LLaVA video models: accuracy of the generated answers per kind of question, and (`controls`) the table with
    mean pool (every frame's tokens replaced by the clip's mean), single frame, shuffled and reversed clips."""
    rows = read_video_questions(data)[:limit]
    clips = temporal_clips(rows, pipe.transform, num_frames, seed)
    kept = clips["kept"]

    def answer(batch: list[torch.Tensor], how: str | None) -> list[str]:
        out = []
        for s in range(0, len(batch), batch_size):
            qs = [rows[i]["question"] for i in kept[s : s + batch_size]]
            out += pipe.answer_video(batch[s : s + batch_size], qs, time_pool=how)
        return out

    if not controls:
        if not kept:
            raise DataError(f"{data}: no decodable videos ({clips['skipped'][0]})")
        return {"accuracy_by_type": _accuracy_by_kind(rows, kept, answer(clips["model"], None))}
    result = temporal_table(rows, clips, answer, "frames as tokens", model_name, data)
    if out_dir is not None:
        write_temporal_report(result, Path(out_dir))
    return result


def format_temporal_table(result: dict) -> str:
    """The table as Markdown: one row per model/control, one column per kind of question."""
    m = result["metrics"]
    kinds = list(m["chance"])
    lines = ["| | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for name, accs in m["table"].items():
        label = name + (" (vs the flipped answer)" if name == "reversed" else "")
        lines.append(
            f"| {label} | " + " | ".join(f"{accs[k]:.3f}" if k in accs else "-" for k in kinds) + " |"
        )
    lines.append("| chance | " + " | ".join(f"{m['chance'][k]:.3f}" for k in kinds) + " |")
    return "\n".join(lines)


def write_temporal_report(result: dict, out: Path) -> None:
    """temporal.json, temporal.png (grouped bars with chance marked) and temporal.md."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "temporal.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "temporal.md").write_text(format_temporal_table(result) + "\n")
    m = result["metrics"]
    kinds, names = list(m["chance"]), list(m["table"])
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(kinds), 3.6))
    width = 0.8 / len(names)
    for j, name in enumerate(names):
        xs = np.arange(len(kinds)) + (j - (len(names) - 1) / 2) * width
        ax.bar(xs, [m["table"][name].get(k, 0.0) for k in kinds], width, label=name)
    for k, kind in enumerate(kinds):
        ax.hlines(m["chance"][kind], k - 0.45, k + 0.45, colors="black", linestyles="dashed")
    ax.set_xticks(range(len(kinds)), kinds)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy (dashed: chance)")
    ax.set_title(f"{result['model'] or 'model'} ({m['pool']} pool)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(out / "temporal.png", dpi=120)
    plt.close(fig)

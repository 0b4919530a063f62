"""Contrastive training on video clips (CLIP4Clip): every sampled frame through the image tower, the frame
embeddings pooled into one video embedding (the model's `video.pool`: meanP or seqTransf), InfoNCE or sigmoid
loss against the captions. Data: a video manifest (`{"video", "caption"}` rows) or shards of videos, decoded once
into memory (`vlmkit.data.video.VideoClips`, `data.num_frames` sampled uniformly per clip); evaluation: video
retrieval, zero-shot video classification and, for rows with multiple choices, the temporal table.

With `data.frame_features` (towers frozen) the image tower embeds every training clip's frames once, before
training, and the steps train the temporal transformer on those embeddings: thousands of steps in the time a few
hundred take through the towers (`benchmarks/video_seqtransf_probe.py` measured what that buys)."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.distributed as torch_dist
from torch import nn

from vlmkit.data.transforms import ImageTransform
from vlmkit.data.video import VideoClips, load_video_samples
from vlmkit.errors import ConfigError
from vlmkit.tasks.base import log
from vlmkit.tasks.contrastive import ContrastiveTask


def collate_clips(
    tokenizer, items: list, reversed_negatives: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B', T, 3, S, S) clips and (B', L) tokens. With `reversed_negatives`, every clip whose row gives a reversed
    caption different from its caption is also in the batch played backwards with that caption: the hard negative
    that teaches the arrow of time (in-batch, it differs from its partner only in frame order)."""
    clips, captions = [it[0] for it in items], [it[1] for it in items]
    if reversed_negatives:
        extra = [(it[0].flip(0), it[2]) for it in items if it[2] and it[2] != it[1]]
        if (
            extra
            and torch_dist.is_initialized()
            and torch_dist.get_world_size() > 1
            and len(extra) != len(items)
        ):
            raise ConfigError("reversed_negatives with several processes needs a reversed_caption (differing from "
                              "the caption) in every row, so that every rank's batch has the same size")  # fmt: skip
        clips += [c for c, _ in extra]
        captions += [c for _, c in extra]
    return torch.stack(clips), tokenizer(captions)


class FrameFeatures(torch.utils.data.Dataset):
    """Decoded clips whose frames a frozen image tower embeds once (`embed`): item -> (frame embeddings (T, D),
    caption, reversed caption)."""

    def __init__(self, clips: VideoClips):
        self.clips = clips
        self.features: torch.Tensor | None = None  # (N, T, D) float32 on the CPU

    @torch.no_grad()
    def embed(self, model: nn.Module, device, bf16: bool, chunk: int = 256) -> None:
        from tqdm import tqdm

        from vlmkit.eval.video import frame_features

        parts = []
        for start in tqdm(range(0, len(self.clips), chunk), desc="embedding frames", unit="chunk"):
            batch = [self.clips[i][0] for i in range(start, min(start + chunk, len(self.clips)))]
            parts.append(frame_features(model, batch, batch_size=32, device=device, bf16=bf16))
        self.features = torch.cat(parts)

    def set_epoch(self, epoch: int) -> None:
        pass

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str, str]:
        if self.features is None:
            raise RuntimeError("FrameFeatures.embed(model, ...) has not run")
        return self.features[i], self.clips.captions[i], self.clips.reversed_captions[i]


class VideoContrastiveTask(ContrastiveTask):
    name = "video-contrastive"
    shards = False  # VideoClips reads shards itself, into memory

    def training_texts(self) -> list[str]:
        return [s.caption for s in load_video_samples(self.cfg.data.train)[0]]

    def train_set(self) -> VideoClips | FrameFeatures:
        cfg, t = self.cfg, self.trainer
        if cfg.data.frame_features:  # embedded in `prepare_model`, once the (frozen) model exists
            clips = VideoClips(cfg.data.train, ImageTransform(t.preprocess, train=False), cfg.data.num_frames,
                               cfg.data.max_bad_fraction, cfg.seed, log, progress=True)  # fmt: skip
            return FrameFeatures(clips)
        return VideoClips(cfg.data.train, t.train_transform, cfg.data.num_frames, cfg.data.max_bad_fraction,
                          cfg.seed, log, progress=True)  # fmt: skip

    def prepare_model(self, model: nn.Module) -> None:
        super().prepare_model(model)
        if self.cfg.data.frame_features:
            trained = [n for n, p in model.named_parameters() if p.requires_grad and n.startswith("visual.")]
            if trained:
                raise ConfigError("data.frame_features embeds the frames once, so the image tower must not train: "
                                  f"freeze it (freeze: ['^visual\\.']); {trained[0]} trains")  # fmt: skip
            if model.temporal is None:
                raise ConfigError(
                    "data.frame_features trains the temporal transformer: set video.pool=transformer"
                )
            t = self.trainer
            self.trainer.train_set.embed(model, t.device, t.precision.bf16)

    def collate(self):
        return functools.partial(
            collate_clips, self.trainer.tokenizer, reversed_negatives=self.cfg.data.reversed_negatives
        )

    def losses(self, model: nn.Module, batch) -> dict[str, torch.Tensor]:
        clips, tokens = batch
        if self.cfg.data.frame_features:  # (B, T, D) cached frame embeddings
            video = model.pool_frames(clips, normalize=True)
            text = model.encode_text(tokens, normalize=True)
            loss = self.loss_fn(video, text, *model.scale_and_bias())
            return {"loss": loss, self.trainer.model_cfg.loss: loss.detach()}
        clips = self.trainer.train_transform.normalize(clips)  # (B, T, 3, S, S) uint8 -> float
        out = model(clips, tokens)  # 5-d input: CLIP.forward pools the frames
        loss = self.loss_fn(out.image_features, out.text_features, out.logit_scale, out.logit_bias)
        return {"loss": loss, self.trainer.model_cfg.loss: loss.detach()}

    def build_val(self) -> dict | None:
        cfg, t, val = self.cfg, self.trainer, {}
        eval_tf = ImageTransform(t.preprocess, train=False)
        if cfg.data.val:
            ds = VideoClips(cfg.data.val, eval_tf, cfg.data.num_frames, cfg.data.max_bad_fraction, log_=log)
            val["clips"] = [ds[i][0] for i in range(len(ds))]
            val["captions"] = ds.captions
        return val or None

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        from vlmkit.eval.features import extract_text_features
        from vlmkit.eval.retrieval import retrieval_metrics
        from vlmkit.eval.video import frame_features, pool

        t, val, metrics = self.trainer, self.trainer.val, {}
        if "clips" in val:
            video = pool(model, frame_features(model, val["clips"], device=t.device, bf16=t.precision.bf16))
            text = extract_text_features(
                model, t.tokenizer, val["captions"], device=t.device, bf16=t.precision.bf16
            )
            r = retrieval_metrics(video, text, torch.arange(len(video)), ks=(1, 5))
            metrics["val/video_retrieval_recall@1"] = r["image_retrieval_recall@1"]
            metrics["val/text_retrieval_recall@1"] = r["text_retrieval_recall@1"]
        return metrics

    def final_evals(self, model: nn.Module) -> None:
        """eval/retrieval.json; eval/zeroshot.json for a zero-shot video folder; eval/temporal.* when the
        validation rows carry multiple choices (the moving-shapes data does)."""
        from vlmkit.eval.features import save_results
        from vlmkit.eval.templates import load_templates
        from vlmkit.eval.video import evaluate_temporal, evaluate_video_retrieval, evaluate_video_zeroshot

        cfg, t = self.cfg, self.trainer
        ev = t.out / "eval"
        ev.mkdir(exist_ok=True)
        common = dict(
            num_frames=cfg.data.num_frames, device=t.device, model_name=str(t.out), bf16=t.precision.bf16
        )
        if cfg.data.val:
            r = evaluate_video_retrieval(model, t.tokenizer, t.preprocess, cfg.data.val, **common)
            save_results(r, ev / "retrieval.json")
            if (
                Path(cfg.data.val).suffix == ".jsonl"
                and '"choice_captions"' in Path(cfg.data.val).read_text()
            ):
                evaluate_temporal(model, t.tokenizer, t.preprocess, cfg.data.val, out_dir=ev, **common)
        if cfg.data.zeroshot:
            templates = load_templates(cfg.data.zeroshot_templates)
            r = evaluate_video_zeroshot(model, t.tokenizer, t.preprocess, cfg.data.zeroshot, templates, out_dir=ev,
                                        **common)  # fmt: skip
            save_results(r, ev / "zeroshot.json")

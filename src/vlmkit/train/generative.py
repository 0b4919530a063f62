"""Training generative VLMs (LLaVA-style and CoCa) on image conversations, in one or several stages.

    cfg = get_recipe("llava-tiny-shapes")      # a GenerativeTrainConfig
    train_generative(cfg)

Data are LLaVA-format conversation files (JSONL rows `{"image", "conversations": [{"from": "human",
"value": "<image>\\n..."}, {"from": "gpt", "value": ...}]}`; see `vlmkit.data.vqa`), rendered with the
model's chat template; the loss is on the assistant's tokens only (a batch without any is an error: a
template that does not match the data would otherwise train on nothing). CoCa adds its contrastive loss
on the rows whose "type" is "caption".

Stages (LLaVA's recipe: align the projector on captions, then tune on instructions) run one after the
other: each is an ordinary run of `GenerativeTrainer` that starts from the previous stage's weights and
freezes what its `freeze` regexes say; the last stage writes to `out` itself, earlier ones to
`out/stage<i>-<name>`. `--resume` skips finished stages and resumes the unfinished one.

`GenerativeTrainer` is the dual-encoder `Trainer` (processes, schedule, checkpoints, time budget, signals,
logging) with the model, data, loss and evaluation hooks replaced.
"""

from __future__ import annotations

import functools
import logging
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from vlmkit.config import override, to_dict
from vlmkit.data.chat import IMAGE_TOKEN, collate, get_template, render
from vlmkit.data.tokenizer import Tokenizer
from vlmkit.data.transforms import ImageTransform, load_image
from vlmkit.errors import ConfigError, DataError
from vlmkit.models.registry import build_model, model_family
from vlmkit.pipeline import coca_turns
from vlmkit.train import distributed as dist
from vlmkit.train.loop import TrainConfig, Trainer

log = logging.getLogger("vlmkit.train")

STAGE_KEYS = (
    "name",
    "recipe",  # a dual-encoder recipe (e.g. "clip-tiny"): this stage pretrains the vision tower contrastively
    "train_data",
    "val_data",
    "zeroshot_data",
    "zeroshot_templates",
    "smoke",  # with "recipe": shrink that recipe as `vlmkit train --smoke` does
    "model_overrides",  # with "recipe": refine that recipe's model overrides (dotted keys)
    "time_budget",
    "max_steps",
    "epochs",
    "lr",
    "lr_scale",
    "warmup_steps",
    "freeze",
    "batch_size",
    "compile",
)


@dataclass
class GenerativeTrainConfig(TrainConfig):
    """A `TrainConfig` for CoCa / LLaVA models. `train_data` and `val_data` are conversation files (several
    joined with "::"); `val_data` is evaluated with generation (VQA accuracy by question type, captions)."""

    model: str = "llava-tiny"
    out: str = "runs/llava"
    # [{name, train_data, time_budget, max_steps, epochs, lr, warmup_steps, freeze, batch_size}, ...]; empty =
    # one stage from the fields above
    stages: list[dict[str, Any]] = field(default_factory=list)
    synthetic_data: str | None = (
        None  # a folder for the built-in shapes data and its tasks, written if missing
    )
    synthetic_args: dict[str, Any] = field(default_factory=dict)  # vlmkit.data.synthetic.generate arguments
    questions_per_image: int = 3
    # conversations per training scene of several objects in the synthetic data's train_chat.jsonl
    # (vlmkit.data.vqa.write_tasks)
    multi_object_chats: int = 1
    # files a new tokenizer learns from (default: train_data); set by stages
    tokenizer_data: str | None = None
    # A CLIP/SigLIP model folder (a vlmkit run or a Hugging Face folder) whose image tower (config and weights)
    # becomes this model's vision tower (LLaVA's pretrained vision encoder); its mean/std too.
    vision_init_from: str | None = None
    max_len: int = 128  # tokens per training conversation (longer ones lose their end)
    eval_limit: int = 256  # rows of val_data for each periodic evaluation
    final_eval_limit: int | None = 2000  # rows for the final VQA / captioning evaluation (None = all)
    eval_batch_size: int = 64

    def __post_init__(self):
        super().__post_init__()
        if self.lock_image:
            raise ConfigError("lock_image is for CLIP; freeze a generative model's parts with --freeze REGEX")
        for i, stage in enumerate(self.stages):
            unknown = set(stage) - set(STAGE_KEYS)
            if unknown:
                raise ConfigError(
                    f"stages[{i}]: unknown keys {sorted(unknown)}; stage keys are {', '.join(STAGE_KEYS)}"
                )
            if "model_overrides" in stage and "recipe" not in stage:
                raise ConfigError(
                    f"stages[{i}]: model_overrides applies to a stage with a recipe (the contrastive stage); "
                    "the generative model's overrides are the config's own model_overrides"
                )


def split_files(spec: str | None) -> list[str]:
    return [s for s in (spec or "").split("::") if s.strip()]


class ConversationDataset(torch.utils.data.Dataset):
    """Rendered conversations and their images: item -> (uint8 image (3, S, S), input_ids, labels, is_caption).

    Images are decoded once and kept (many questions share one image); conversations are tokenised on
    first use.
    """

    def __init__(self, rows: list[dict], transform: ImageTransform, render_row):
        self.rows = rows
        self.transform = transform
        self.render_row = render_row
        self.images: dict[Path, torch.Tensor] = {}
        self.rendered: dict[int, tuple[list[int], list[int]]] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def set_epoch(self, epoch: int) -> None:  # the trainer's hook for per-epoch randomness; none here
        pass

    def __getitem__(self, i: int):
        row = self.rows[i]
        image = self.images.get(row["image"])
        if image is None:
            image = self.images[row["image"]] = self.transform(load_image(row["image"]))
        if i not in self.rendered:
            self.rendered[i] = self.render_row(row)
        ids, labels = self.rendered[i]
        return image, ids, labels, row.get("type") == "caption"


def _collate(pad_token_id: int, items: list) -> dict[str, torch.Tensor]:
    batch = collate([(ids, labels) for _, ids, labels, _ in items], pad_token_id)
    batch["pixel_values"] = torch.stack([it[0] for it in items])  # (B, 3, S, S) uint8
    batch["is_caption"] = torch.tensor([it[3] for it in items])  # (B,)
    return batch


def read_rows(spec: str) -> list[dict]:
    """Every usable row of the "::"-joined conversation files (bad rows are logged and counted there)."""
    from vlmkit.data.vqa import read_conversations

    rows = []
    for file in split_files(spec):
        rows += list(read_conversations(file))
    if not rows:
        raise DataError(f"no conversation files in {spec!r}")
    return rows


class GenerativeTrainer(Trainer):
    """`Trainer` for CoCa and LLaVA: conversation data, next-token (+ contrastive) loss, VQA evaluation."""

    cfg: GenerativeTrainConfig

    def setup(self) -> None:
        cfg = self.cfg
        if not cfg.train_data:
            raise ConfigError("no training data: pass --train-data CONVERSATIONS.jsonl (LLaVA format)")
        self.vision_source = None
        if cfg.vision_init_from and not cfg.init_from:
            from vlmkit.models.pretrained import load_pretrained

            source = load_pretrained(cfg.vision_init_from)
            if model_family(source.model.cfg) != "clip":
                raise ConfigError(
                    f"vision_init_from {cfg.vision_init_from} is not a CLIP/SigLIP model folder"
                )
            self.vision_source = source.model.visual
            vision = to_dict(source.model.cfg.vision)
            self.cfg = replace(
                cfg,
                model_overrides={**cfg.model_overrides, "vision": vision},
                mean=tuple(source.preprocess.mean),
                std=tuple(source.preprocess.std),
            )
        super().setup()

    @property
    def family(self) -> str:
        """ "coca" or "llava", from the model config in use."""
        return model_family(self.model_cfg)

    # ---------------------------------------------------------------- hooks
    def _tokenizer_overrides(self) -> dict[str, Any]:
        tok = self.tokenizer
        out = {
            "decoder.vocab_size": tok.vocab_size,
            "decoder.bos_token_id": tok.sot_token_id,
            "decoder.eos_token_id": tok.eot_token_id,
            "decoder.pad_token_id": tok.pad_token_id,
        }
        if self.family == "llava":
            out["image_token_id"] = tok.token_to_id(IMAGE_TOKEN)
        return out

    def _shard_data(self) -> bool:
        return False  # conversation files only, for now

    def _context_length(self) -> int:
        # The tokenizer's fixed-length framing is only used for CoCa's contrastive text side (zero-shot prompts).
        return min(77, self.model_cfg.decoder.max_seq_len)

    def _training_texts(self) -> list[str]:
        texts = []
        for row in read_rows(self.cfg.tokenizer_data or self.cfg.train_data):
            for turn in row["conversations"]:
                texts.append(str(turn.get("value", turn.get("content", ""))).replace(IMAGE_TOKEN, " "))
        if self.family == "llava":
            # The template's own words ("USER:", "ASSISTANT:", the system prompt) occur in every row: make
            # them whole tokens rather than byte pieces.
            t = get_template(self.model_cfg.chat_template)
            words = [t.system or "", t.system_format, t.user_format, t.assistant_prefix, t.end_of_turn or ""]
            texts += [" ".join(words).replace("{system}", " ").replace("{content}", " ")] * max(
                1, len(texts) // 10
            )
        return texts

    def _new_tokenizer(self, texts: list[str]) -> Tokenizer:
        return Tokenizer.train(
            texts,
            vocab_size=self.cfg.vocab_size,
            context_length=self._context_length(),
            extra_special_tokens=[IMAGE_TOKEN],
        )

    def _render_row(self, row: dict) -> tuple[list[int], list[int]]:
        cfg = self.cfg
        conversation = row["conversations"]
        if self.family == "coca":
            conversation = coca_turns(conversation, is_caption=row.get("type") == "caption")
            template, n, image_id = "plain", 0, None
        else:
            template = self.model_cfg.chat_template
            n, image_id = self.model_cfg.num_image_tokens, self.model_cfg.image_token_id
        return render(
            conversation,
            self.tokenizer,
            template,
            num_image_tokens=n,
            image_token_id=image_id,
            max_len=cfg.max_len,
            row=f"{row['image']} (line {row.get('line', '?')})",
        )

    def _build_train_set(self) -> int:
        # No random crops: questions about counts and positions must stay true of the image the model sees.
        transform = ImageTransform(self.preprocess, train=False, uint8=True)
        self.train_set = ConversationDataset(read_rows(self.cfg.train_data), transform, self._render_row)
        return len(self.train_set)

    def _collate_fn(self):
        return functools.partial(_collate, self.tokenizer.pad_token_id)

    def _new_model(self) -> torch.nn.Module:
        model = build_model(self.model_cfg)
        if self.vision_source is not None:  # copy the pretrained image tower (all but a mismatched head)
            tower = model.vision_tower if self.family == "llava" else model.visual
            target = tower.state_dict()
            state = {
                k: v
                for k, v in self.vision_source.state_dict().items()
                if k in target and target[k].shape == v.shape
            }
            tower.load_state_dict(state, strict=False)
            if dist.is_main():
                log.info(
                    "vision tower: %d of %d tensors from %s",
                    len(state),
                    len(target),
                    self.cfg.vision_init_from,
                )
            self.vision_source = None
        return model

    def _build_loss(self):
        if self.family == "coca":
            from vlmkit.losses.coca import CoCaLoss

            c = self.model_cfg
            return CoCaLoss(
                caption_weight=c.caption_loss_weight, contrastive_weight=c.contrastive_loss_weight
            )
        from vlmkit.losses.captioning import next_token_loss

        return next_token_loss

    def _micro_step_loss(self, batch: dict) -> torch.Tensor:
        dev = self.device
        pixels = self.train_transform.normalize(batch["pixel_values"].to(dev, non_blocking=True))
        ids = batch["input_ids"].to(dev, non_blocking=True)
        mask = batch["attention_mask"].to(dev, non_blocking=True)
        labels = batch["labels"].to(dev, non_blocking=True)
        model = self.model  # for the output heads; train_model (maybe DDP-wrapped) runs the forward
        with self.autocast():
            if self.family == "coca":
                out = self.train_model(pixels, ids, mask)
                is_caption = batch["is_caption"].to(dev)
                losses = self.loss_fn(out, labels, model.decoder.lm_head, is_caption=is_caption)
                return losses["loss"]
            out = self.train_model(ids, pixels, mask, logits="none")
            return self.loss_fn(out.hidden, labels, model.language_model.lm_head)

    def _train_mode(self) -> None:
        self.model.train()

    def _prepare_transfer(self) -> None:
        super()._prepare_transfer()
        unused = getattr(self.model, "unused_parameter_names", lambda: [])()
        params = dict(self.model.named_parameters())
        for name in unused:
            params[name].requires_grad_(False)
        if unused and dist.is_main():
            log.info(
                "%d vision-tower tensors after the feature layer are unused and stay frozen", len(unused)
            )

    # ---------------------------------------------------------------- evaluation
    def _build_val(self) -> dict | None:
        if not self.cfg.val_data:
            return None
        files = {file: read_rows(file) for file in split_files(self.cfg.val_data)}
        rows = [row for file_rows in files.values() for row in file_rows]
        random.Random(self.cfg.seed).shuffle(rows)  # a fixed sample that mixes question types
        return {"rows": rows, "captions": {f: r[0].get("type") == "caption" for f, r in files.items()}}

    def pipeline(self):
        from vlmkit.pipeline import VLMPipeline

        return VLMPipeline(
            self.model, self.tokenizer, self.preprocess, self.device, precision=self.precision.name
        )

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """VQA accuracy (overall and by question type) on the first `eval_limit` validation questions."""
        if not self.val or not dist.is_main():
            return {}
        from vlmkit.eval.vqa import evaluate_vqa

        rows = [r for r in self.val["rows"] if r.get("type") != "caption"][: self.cfg.eval_limit]
        if not rows:
            return {}
        pipe = self.pipeline()
        result = evaluate_vqa(pipe.answer, rows, batch_size=self.cfg.eval_batch_size, progress=False)
        self._train_mode()
        m = result["metrics"]
        metrics = {"val/vqa_accuracy": m["accuracy"]}
        if m["counting_accuracy"] is not None:
            metrics["val/vqa_counting"] = m["counting_accuracy"]
        for kind, acc in m["accuracy_by_type"].items():
            metrics[f"val/vqa_{kind}"] = acc
        return metrics

    def run_final_evals(self) -> None:
        """VQA and captioning results (JSON, plots, report.html) in <run>/eval/."""
        from vlmkit.eval.vqa import evaluate_captioning, evaluate_vqa

        if not self.val:
            return
        ev = self.out / "eval"
        ev.mkdir(exist_ok=True)
        pipe = self.pipeline()
        common = dict(
            batch_size=self.cfg.eval_batch_size,
            limit=self.cfg.final_eval_limit,
            out_dir=ev,
            model_name=str(self.out),
        )
        for file, captions in self.val["captions"].items():
            if captions:
                evaluate_captioning(pipe.caption, file, **common)
            else:
                evaluate_vqa(pipe.answer, file, **common)


# -------------------------------------------------------------------------------------------- stages


def prepare_synthetic(cfg: GenerativeTrainConfig) -> None:
    """Write the built-in shapes data and its caption / question files to `cfg.synthetic_data` unless there."""
    from vlmkit.data.synthetic import generate, is_current
    from vlmkit.data.vqa import tasks_are_current, write_tasks

    root = Path(cfg.synthetic_data)
    tasks = dict(
        seed=cfg.synthetic_args.get("seed", 0),
        questions_per_image=cfg.questions_per_image,
        multi_object_chats=cfg.multi_object_chats,
    )
    if not is_current(root, **cfg.synthetic_args):
        print(f"writing the synthetic 'shapes' dataset and its questions to {root}")
        generate(root, **cfg.synthetic_args)
    elif tasks_are_current(root, splits=("train", "val"), **tasks):
        return
    write_tasks(root, **tasks)


def _fill(spec: str | None, data: str | None) -> str | None:
    return spec.replace("{data}", data) if spec and data else spec


def stage_configs(cfg: GenerativeTrainConfig) -> list[tuple[str, TrainConfig]]:
    """(name, config) per stage. A stage with a "recipe" trains a dual encoder (a TrainConfig) whose image
    tower the next generative stage starts from; every other stage starts from the previous generative
    stage's model. The last stage writes to cfg.out, the others to cfg.out/stage<i>-<name>."""
    from vlmkit.recipes import get_recipe, smoke

    data = cfg.synthetic_data
    base = replace(cfg, train_data=_fill(cfg.train_data, data), val_data=_fill(cfg.val_data, data))
    if not cfg.stages:
        return [("train", base)]
    generative = [s for s in cfg.stages if "recipe" not in s]
    all_data = "::".join(_fill(s.get("train_data", cfg.train_data), data) for s in generative)
    out, prev, vision, runs = Path(cfg.out), cfg.init_from, cfg.vision_init_from, []
    for i, stage in enumerate(cfg.stages):
        stage = {k: _fill(v, data) if isinstance(v, str) else v for k, v in stage.items()}
        name = stage.pop("name", f"stage{i + 1}")
        last = i == len(cfg.stages) - 1
        run_out = str(out if last else out / f"stage{i + 1}-{name}")
        recipe = stage.pop("recipe", None)
        if recipe is not None:  # contrastive pretraining of the vision tower
            shrink = stage.pop("smoke", False)
            clip = get_recipe(recipe)
            # the stage's model overrides refine the recipe's (and a smoke run still shrinks the result)
            clip = replace(clip, model_overrides={**clip.model_overrides, **stage.pop("model_overrides", {})})
            clip = smoke(clip) if shrink else clip
            fields = {"seed": cfg.seed, "num_workers": cfg.num_workers, "precision": cfg.precision, **stage}
            runs.append((name, override(clip, {**fields, "out": run_out, "resume": cfg.resume})))
            vision = run_out
            continue
        stage_cfg = override(base, {**stage, "stages": [], "out": run_out}, where=f"stages[{i}]")
        if not last:  # intermediate models get a quick look, the final one the full evaluation
            quick = min(cfg.eval_limit, cfg.final_eval_limit or cfg.eval_limit)
            stage_cfg = replace(stage_cfg, final_eval_limit=quick)
        stage_cfg = replace(
            stage_cfg,
            init_from=prev,
            vision_init_from=vision if prev is None else None,
            tokenizer=cfg.tokenizer if prev is None else None,
            tokenizer_data=all_data if prev is None else None,
        )
        runs.append((name, stage_cfg))
        prev = run_out
    return runs


def train_generative(cfg: GenerativeTrainConfig) -> dict:
    """Run every stage of `cfg` in order; returns the last stage's summary (with every stage's under "stages")."""
    from vlmkit.train.loop import train

    if cfg.synthetic_data and dist.is_main():
        prepare_synthetic(cfg)
    if cfg.synthetic_data:
        dist.barrier()
    summaries = {}
    stages = stage_configs(cfg)
    for name, stage_cfg in stages:
        done = Path(stage_cfg.out) / "summary.json"
        if cfg.resume and done.is_file() and Path(stage_cfg.out) != Path(cfg.out):
            if dist.is_main():
                print(f"stage {name}: finished earlier in {stage_cfg.out}, skipping")
            continue
        if dist.is_main() and len(stages) > 1:
            print(f"stage {name} -> {stage_cfg.out}")
        if isinstance(stage_cfg, GenerativeTrainConfig):
            summaries[name] = GenerativeTrainer(stage_cfg).fit()
        else:
            summaries[name] = train(stage_cfg)
    last = summaries[list(summaries)[-1]] if summaries else {}
    return {**last, "stages": summaries} if len(summaries) > 1 else last

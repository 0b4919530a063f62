"""`TrainConfig`: everything one training run needs, for every family, as one tree of dataclasses:

    TrainConfig            the run: output folder, batch, schedule, precision, seed, logging, stages
      .model   ModelConfig     what to build: a registry name, its overrides, tokenizer, pixel statistics
      .data    DataConfig      what to read: manifests, shards or conversation files, the built-in data
      .task    TaskConfig      how the family's task trains and evaluates (vlmkit.tasks)
      .optim   OptimConfig     AdamW, the learning-rate schedule, clipping, frozen and rescaled parameters
      .parallel ParallelConfig compile, activation checkpointing, DDP or FSDP2 (vlmkit.train.parallelize)
      .transfer TransferConfig fine-tuning: the model to start from, LiT, LoRA

It is saved as train_config.json beside every checkpoint. Every field also has a short flat name (its own
name, or the older one: `lr` for `optim.lr`, `train_data` for `data.train`), which recipes, stages and
`--set` use: `make_config(lr=1e-3, train_data="x.jsonl")` equals
`make_config({"optim.lr": 1e-3, "data.train": "x.jsonl"})`. Recipes (`vlmkit.recipes`) are such configs.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any

from vlmkit.config import override
from vlmkit.errors import ConfigError
from vlmkit.nn.lora import DEFAULT_TARGETS
from vlmkit.runtime import check_precision

PARALLEL = ("auto", "ddp", "fsdp")


@dataclass
class ModelConfig:
    """What to build. `init_from` (TransferConfig) replaces all of it with the saved model's."""

    name: str = "clip-tiny"  # a name from `vlmkit.models.list_models()`
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted keys, e.g. {"vision.layers": 6}
    tokenizer: str | None = None  # an existing tokenizer.json; None = train byte-level BPE on the captions
    vocab_size: int = 4096  # upper bound for a trained tokenizer
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)  # pixel normalisation
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class DataConfig:
    """What to read. Contrastive models: JSONL/CSV manifests of {"image", "caption"} or shards
    (dir/{00000..00127}.tar); CoCa/LLaVA: LLaVA-format conversation files, several joined with "::"."""

    train: str = ""
    val: str | None = None  # contrastive: loss + retrieval; CoCa/LLaVA: VQA accuracy and captioning
    zeroshot: str | None = None  # ImageFolder for periodic + final zero-shot evaluation
    zeroshot_templates: list[str] | None = None  # templates or template files; None = defaults
    # rows of image, caption and foils (vlmkit.eval.compositional) for a final compositional evaluation
    compositional: str | None = None
    # fusion models: a compositional file of training images; each image's (true caption, foil) pairs are
    # extra ITM examples, the caption a positive and the foil a negative
    hard_negatives: str | None = None
    tokenizer_data: str | None = None  # files a new tokenizer learns from (default: train)
    # group-balanced sampling (a bias mitigation): each epoch draws its rows with replacement, row i with
    # weight N / (|G| n_g(i)) over the groups of these manifest columns, so every group is seen equally often
    group_balance: bool = False
    group_columns: list[str] = field(default_factory=lambda: ["label", "background"])
    crop_scale: tuple[float, float] = (0.5, 1.0)  # random-resized-crop area range
    max_bad_fraction: float = 0.01  # stop if more than this fraction of rows is unreadable
    num_workers: int = 0
    cache_images: bool = True  # decode once and keep (downscaled) in memory; off for data larger than RAM
    shuffle_buffer: int = 1000  # shards: samples in each reader's shuffle buffer
    resampled: bool = False  # shards: every reader draws shards with replacement (infinite) instead of
    # reading its own disjoint share of them
    # The built-in shapes data and its caption / question files, written here if missing ("{data}" in a
    # path names this folder); `synthetic_args` are vlmkit.data.synthetic.generate's arguments.
    synthetic: str | None = None
    synthetic_args: dict[str, Any] = field(default_factory=dict)
    questions_per_image: int = 3
    multi_object_chats: int = 1  # conversations per training scene of several objects (vlmkit.data.vqa)
    num_frames: int = 8  # video: frames sampled uniformly from each clip (vlmkit.data.video)
    # video dual encoders: a clip whose row has a "reversed_caption" is also trained played backwards with it
    reversed_negatives: bool = True
    # video dual encoders: train on frame embeddings the frozen image tower computes once per clip (no
    # augmentation); for a stage that trains only the temporal transformer (`freeze` the towers)
    frame_features: bool = False
    # "shapes" (vlmkit.data.synthetic) or "moving-shapes" (vlmkit.data.synthetic_video) for `synthetic`
    synthetic_kind: str = "shapes"


@dataclass
class TaskConfig:
    """The task that trains the model (vlmkit.tasks): by default the one its family's registry row names."""

    name: str = ""  # "" = the model family's task
    max_len: int = 128  # CoCa/LLaVA: tokens per training conversation (longer ones lose their end)
    eval_limit: int = 256  # CoCa/LLaVA: rows of data.val for each periodic evaluation
    final_eval_limit: int | None = 2000  # rows for the final VQA / captioning evaluation (None = all)
    eval_batch_size: int = 64
    phase: str = ""  # dalle: "vqvae" trains the image tokenizer, "transformer" the model over its codes


@dataclass
class OptimConfig:
    """AdamW with linear warmup and cosine decay (vlmkit.train.optim)."""

    lr: float = 1e-3
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 50
    grad_clip: float | None = 1.0
    freeze: list[str] = field(default_factory=list)  # regexes over parameter names: frozen, not optimised
    lr_scale: dict[str, float] = field(default_factory=dict)  # regex -> lr multiplier; 0 freezes

    def __post_init__(self):
        # `--set freeze=REGEX` gives a string, `--set lr_scale.REGEX=0.1` a string factor
        self.freeze = [self.freeze] if isinstance(self.freeze, str) else list(self.freeze)
        scales = {}
        for pattern, factor in self.lr_scale.items():
            try:
                scales[pattern] = float(factor)
            except (TypeError, ValueError):
                scales[pattern] = -1.0
            if not scales[pattern] >= 0:
                raise ConfigError(f"lr_scale {pattern!r}: the factor must be a number >= 0, not {factor!r}")
        self.lr_scale = scales


@dataclass
class ParallelConfig:
    """Applied in this order (vlmkit.train.parallelize): compile, activation checkpointing, then with
    several processes DDP or FSDP2 ("auto": DDP; "fsdp" shards parameters, gradients and optimizer state
    across processes and checkpoints with torch.distributed.checkpoint)."""

    strategy: str = "auto"
    compile: bool = False
    grad_checkpointing: bool = False

    def __post_init__(self):
        if self.strategy not in PARALLEL:
            raise ConfigError(f"parallel must be one of {', '.join(PARALLEL)}, not {self.strategy!r}")


@dataclass
class TransferConfig:
    """Fine-tuning (vlmkit.train.transfer). `init_from` is a model folder (a vlmkit run or a Hugging Face
    CLIP/SigLIP/LLaVA folder): its config, tokenizer and preprocessing replace the model section."""

    init_from: str | None = None
    # with init_from: config changes that keep the model's weights (e.g. {"vision.patch_dropout": 0.0} for
    # FLIP's unmasked tuning); a change that needs other weights is an error
    init_overrides: dict[str, Any] = field(default_factory=dict)
    # A CLIP/SigLIP model folder whose image tower (config and weights) becomes this model's vision tower
    # (LLaVA's pretrained vision encoder); its mean/std too.
    vision_init_from: str | None = None
    # A CLIP/SigLIP model folder whose text tower (config, weights and tokenizer) conditions a flow model,
    # frozen
    text_init_from: str | None = None
    lock_image: bool = False  # LiT: freeze the image tower and keep it in eval mode (dual encoders)
    lora_rank: int = 0  # > 0: train LoRA adapters of this rank instead of the weights; merged when saved
    lora_alpha: float | None = None  # LoRA scaling is lora_alpha / lora_rank; None = lora_rank
    lora_targets: str = DEFAULT_TARGETS  # regex over module names of the Linears to adapt
    lora_also_train: list[str] = field(default_factory=list)  # with LoRA: regexes of params that train too

    def __post_init__(self):
        if isinstance(self.lora_also_train, str):
            self.lora_also_train = [self.lora_also_train]
        if not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            raise ConfigError(f"lora_rank must be an integer >= 0 (0 = no LoRA), not {self.lora_rank!r}")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise ConfigError(f"lora_alpha must be > 0, not {self.lora_alpha!r}")
        if self.lora_also_train and not self.lora_rank:
            raise ConfigError(
                "lora_also_train needs lora_rank > 0; without LoRA everything not frozen trains"
            )


# What one entry of `TrainConfig.stages` may set (flat names, see ALIASES).
STAGE_KEYS = (
    "name",
    "recipe",  # another recipe (e.g. "clip-tiny"), trained as this stage: the contrastive stage of the
    # generative recipes, whose image tower the next stage starts from
    "smoke",  # with "recipe": shrink that recipe as `vlmkit train --smoke` does
    "model_overrides",  # with "recipe": refine that recipe's model overrides (dotted keys)
    "init_overrides",  # config changes to the previous stage's model that keep its weights
    "train_data",
    "val_data",
    "zeroshot_data",
    "zeroshot_templates",
    "time_budget",
    "time_share",  # the stage's share of the config's time_budget (when one is set)
    "max_steps",
    "epochs",
    "lr",
    "lr_scale",
    "warmup_steps",
    "freeze",
    "batch_size",
    "compile",
    "phase",  # the dalle task: which part the stage trains
    "task",  # another task for this stage (clip-video-tiny: "contrastive" on still frames before video)
    "frame_features",  # video-contrastive: train the temporal pool on cached frame embeddings
)


@dataclass
class TrainConfig:
    """One training run. The model's family picks the task that trains it (`vlmkit.tasks`): contrastive
    (CLIP, SigLIP, FLIP) on image-caption manifests or shards; CoCa and LLaVA on conversation files."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    out: str = "runs/clip"
    batch_size: int = 128  # global: across processes and accumulation steps
    grad_accum: int = 1
    epochs: float = 30
    max_steps: int | None = None  # overrides epochs when set
    time_budget: float | None = None  # minutes of training; the schedule is fitted to the budget
    precision: str = "auto"  # "auto" (bf16 where this device runs it fast, else fp32), "bf16" (autocast,
    # fp32 weights) or "fp32"; see vlmkit.runtime
    seed: int = 0
    eval_every: int = 0  # steps; 0 = only at the end
    save_every: int = 500  # steps
    keep_last: int = 2
    log_every: int = 10
    resume: bool = False
    # Stages, run one after the other (vlmkit.train.stages): each entry overrides the fields above for one
    # run (keys: STAGE_KEYS) that starts from the previous stage's model; the last writes to `out`, the
    # others to out/stage<i>-<name>. Empty: one run.
    stages: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self):
        check_precision(self.precision)
        if self.batch_size < 2:
            raise ConfigError("batch_size must be at least 2: contrastive losses need negatives")
        if self.grad_accum < 1:
            raise ConfigError("grad_accum must be >= 1")
        if self.transfer.init_overrides and not (self.transfer.init_from or self.stages):
            raise ConfigError("init_overrides changes the init_from model's config: set init_from too")
        for i, stage in enumerate(self.stages):
            unknown = set(stage) - set(STAGE_KEYS)
            if unknown:
                raise ConfigError(
                    f"stages[{i}]: unknown keys {sorted(unknown)}; stage keys are {', '.join(STAGE_KEYS)}"
                )
            if "model_overrides" in stage and "recipe" not in stage:
                raise ConfigError(
                    f"stages[{i}]: model_overrides applies to a stage with a recipe; a stage that continues "
                    "from the previous one changes its model with init_overrides"
                )

    def task_name(self) -> str:
        """The task that trains this run's model: task.name, or the one its family's registry row names."""
        from vlmkit.models.registry import task_of

        return self.task.name or task_of(self.model.name)


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "task": TaskConfig,
    "optim": OptimConfig,
    "parallel": ParallelConfig,
    "transfer": TransferConfig,
}
# A section set to a plain value sets this field of it: `parallel=fsdp`, `model=clip-small`, `task=coca`.
PRIMARY = {"model": "name", "parallel": "strategy", "task": "name"}
# Flat names whose field is called otherwise in its section
_RENAMED = {
    "model_overrides": "model.overrides",
    "train_data": "data.train",
    "val_data": "data.val",
    "zeroshot_data": "data.zeroshot",
    "synthetic_data": "data.synthetic",
    "compositional_data": "data.compositional",
}
# flat name -> path in the tree, for every field of every section
ALIASES: dict[str, str] = {
    f.name: f"{section}.{f.name}"
    for section, cls in SECTIONS.items()
    for f in dataclasses.fields(cls)
    if f"{section}.{f.name}" not in _RENAMED.values() and f.name not in PRIMARY.values()
} | _RENAMED
_TOP = {f.name for f in dataclasses.fields(TrainConfig)} - set(SECTIONS)


def tree_keys(overrides: dict[str, Any], where: str = "config") -> dict[str, Any]:
    """`overrides` with flat names and plain section values rewritten as paths in the tree:
    `{"lr": 1e-3, "parallel": "fsdp", "model_overrides.vision.layers": 6}` ->
    `{"optim.lr": 1e-3, "parallel.strategy": "fsdp", "model.overrides.vision.layers": 6}`."""
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        head, dot, rest = key.partition(".")
        if head in SECTIONS:
            if not dot and not isinstance(value, dict):
                if head not in PRIMARY:
                    raise ConfigError(
                        f"{where}: {head} is a section; set one of its fields, e.g. {head}.KEY=VALUE"
                    )
                key = f"{head}.{PRIMARY[head]}"
        elif head in ALIASES:
            key = ALIASES[head] + (dot + rest)
        elif head not in _TOP:
            known = sorted(_TOP | set(ALIASES) | set(SECTIONS))
            near = difflib.get_close_matches(head, known, n=1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise ConfigError(
                f"{where}: unknown key {head!r}; {hint}keys are the sections ({', '.join(SECTIONS)}) and their "
                f"fields (optim.lr, or lr for short), and {', '.join(sorted(_TOP))}"
            )
        out[key] = value
    return out


def configure(cfg: TrainConfig, overrides: dict[str, Any], where: str = "config") -> TrainConfig:
    """A copy of `cfg` with `overrides` (flat names, dotted tree paths or section dicts) applied."""
    return override(cfg, tree_keys(overrides, where), where=where) if overrides else cfg


def make_config(overrides: dict[str, Any] | None = None, /, **kwargs: Any) -> TrainConfig:
    """A `TrainConfig` from its defaults and flat names or tree paths: `make_config(model="clip-tiny",
    lr=1e-3)`. Also reads a saved train_config.json's contents (the tree, or the flat form of older runs)."""
    return configure(TrainConfig(), {**(overrides or {}), **kwargs})

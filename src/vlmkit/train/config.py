"""`TrainConfig`: everything one training run needs, for every family; saved as train_config.json beside
every checkpoint. Recipes (`vlmkit.recipes`) are instances of it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vlmkit.errors import ConfigError
from vlmkit.nn.lora import DEFAULT_TARGETS
from vlmkit.runtime import check_precision

# What one entry of `TrainConfig.stages` may set.
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
)

PARALLEL = ("auto", "ddp", "fsdp")


@dataclass
class TrainConfig:
    """One training run. The model's family picks the task that trains it (`vlmkit.tasks`): contrastive
    (CLIP, SigLIP, FLIP) on image-caption manifests or shards; CoCa and LLaVA on conversation files."""

    model: str = "clip-tiny"  # a name from `vlmkit.models.list_models()`
    model_overrides: dict[str, Any] = field(default_factory=dict)  # dotted keys, e.g. {"vision.layers": 6}
    train_data: str = ""  # contrastive: JSONL/CSV manifest of {"image", "caption"}, or shards
    # (dir/{00000..00127}.tar); CoCa/LLaVA: LLaVA-format conversation files, several joined with "::"
    val_data: str | None = None  # contrastive: loss + retrieval; CoCa/LLaVA: VQA accuracy and captioning
    zeroshot_data: str | None = None  # ImageFolder for periodic + final zero-shot evaluation
    zeroshot_templates: list[str] | None = None  # templates or template files; None = defaults
    out: str = "runs/clip"
    tokenizer: str | None = None  # an existing tokenizer.json; None = train byte-level BPE on the captions
    vocab_size: int = 4096  # upper bound for a trained tokenizer
    batch_size: int = 128  # global: across processes and accumulation steps
    grad_accum: int = 1
    epochs: float = 30
    max_steps: int | None = None  # overrides epochs when set
    lr: float = 1e-3
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 50
    grad_clip: float | None = 1.0
    precision: str = "auto"  # "auto" (bf16 where this device runs it fast, else fp32), "bf16" (autocast,
    # fp32 weights) or "fp32"; see vlmkit.runtime
    time_budget: float | None = None  # minutes of training; the schedule is fitted to the budget
    crop_scale: tuple[float, float] = (0.5, 1.0)
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    eval_every: int = 0  # steps; 0 = only at the end
    save_every: int = 500  # steps
    keep_last: int = 2
    log_every: int = 10
    seed: int = 0
    max_bad_fraction: float = 0.01
    num_workers: int = 0
    cache_images: bool = True  # decode once and keep (downscaled) in memory; off for data larger than RAM
    shuffle_buffer: int = 1000  # shards: samples in each reader's shuffle buffer
    resampled: bool = False  # shards: every reader draws shards with replacement (infinite) instead of
    # reading its own disjoint share of them
    # Parallelism (vlmkit.train.parallelize), applied in this order: compile, activation checkpointing, then
    # with several processes DDP or FSDP2 ("auto": DDP; "fsdp" shards parameters, gradients and optimizer
    # state across processes and checkpoints with torch.distributed.checkpoint)
    compile: bool = False
    grad_checkpointing: bool = False
    parallel: str = "auto"
    resume: bool = False
    # Transfer learning (see vlmkit.train.transfer). `init_from` is a model folder (a vlmkit run or a Hugging
    # Face CLIP/SigLIP/LLaVA folder): its config, tokenizer and preprocessing replace model, model_overrides,
    # tokenizer, vocab_size, mean and std.
    init_from: str | None = None
    # with init_from: config changes that keep the model's weights (e.g. {"vision.patch_dropout": 0.0} for
    # FLIP's unmasked tuning); a change that needs other weights is an error
    init_overrides: dict[str, Any] = field(default_factory=dict)
    lock_image: bool = False  # LiT: freeze the image tower and keep it in eval mode (dual encoders)
    freeze: list[str] = field(default_factory=list)  # regexes over parameter names: frozen, not optimised
    lr_scale: dict[str, float] = field(default_factory=dict)  # regex -> lr multiplier; 0 freezes
    lora_rank: int = 0  # > 0: train LoRA adapters of this rank instead of the weights; merged when saved
    lora_alpha: float | None = None  # LoRA scaling is lora_alpha / lora_rank; None = lora_rank
    lora_targets: str = DEFAULT_TARGETS  # regex over module names of the Linears to adapt
    lora_also_train: list[str] = field(default_factory=list)  # with LoRA: regexes of params that train too
    # Stages, run one after the other (vlmkit.train.stages): each entry overrides the fields above for one
    # run (keys: STAGE_KEYS) that starts from the previous stage's model; the last writes to `out`, the
    # others to out/stage<i>-<name>. Empty: one run.
    stages: list[dict[str, Any]] = field(default_factory=list)
    # The built-in shapes data and its caption / question files, written here if missing ("{data}" in a
    # path names this folder); `synthetic_args` are vlmkit.data.synthetic.generate's arguments.
    synthetic_data: str | None = None
    synthetic_args: dict[str, Any] = field(default_factory=dict)
    questions_per_image: int = 3
    multi_object_chats: int = 1  # conversations per training scene of several objects (vlmkit.data.vqa)
    # CoCa / LLaVA
    tokenizer_data: str | None = None  # files a new tokenizer learns from (default: train_data)
    # A CLIP/SigLIP model folder whose image tower (config and weights) becomes this model's vision tower
    # (LLaVA's pretrained vision encoder); its mean/std too.
    vision_init_from: str | None = None
    max_len: int = 128  # tokens per training conversation (longer ones lose their end)
    eval_limit: int = 256  # rows of val_data for each periodic evaluation
    final_eval_limit: int | None = 2000  # rows for the final VQA / captioning evaluation (None = all)
    eval_batch_size: int = 64

    def __post_init__(self):
        check_precision(self.precision)
        if self.batch_size < 2:
            raise ConfigError("batch_size must be at least 2: contrastive losses need negatives")
        if self.grad_accum < 1:
            raise ConfigError("grad_accum must be >= 1")
        if self.parallel not in PARALLEL:
            raise ConfigError(f"parallel must be one of {', '.join(PARALLEL)}, not {self.parallel!r}")
        # `--set freeze=REGEX` gives a string, `--set lr_scale.REGEX=0.1` a string factor
        self.freeze = [self.freeze] if isinstance(self.freeze, str) else list(self.freeze)
        if isinstance(self.lora_also_train, str):
            self.lora_also_train = [self.lora_also_train]
        scales = {}
        for pattern, factor in self.lr_scale.items():
            try:
                scales[pattern] = float(factor)
            except (TypeError, ValueError):
                scales[pattern] = -1.0
            if not scales[pattern] >= 0:
                raise ConfigError(f"lr_scale {pattern!r}: the factor must be a number >= 0, not {factor!r}")
        self.lr_scale = scales
        if not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            raise ConfigError(f"lora_rank must be an integer >= 0 (0 = no LoRA), not {self.lora_rank!r}")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise ConfigError(f"lora_alpha must be > 0, not {self.lora_alpha!r}")
        if self.lora_also_train and not self.lora_rank:
            raise ConfigError(
                "lora_also_train needs lora_rank > 0; without LoRA everything not frozen trains"
            )
        if self.init_overrides and not (self.init_from or self.stages):
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

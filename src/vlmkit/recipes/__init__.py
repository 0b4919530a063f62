"""Named training recipes: configs as code, one dict per recipe on top of `TrainConfig`'s defaults, in the
config's flat names (`lr` for `optim.lr`, `train_data` for `data.train`: vlmkit.train.config.ALIASES).

(Over 500 lines: it is one table of every recipe with the reasons for their settings, configs only; split by
family, the stages and settings several families share would be scattered across files.)

`get_recipe(name, **overrides)` returns a `TrainConfig`; `smoke(cfg)` shrinks any recipe to a
seconds-long run (a tiny model, a handful of steps) for testing a setup end to end. Recipes are configs
only: the model's family picks the task that trains it.
"""

from __future__ import annotations

from typing import Any

from vlmkit.data.synthetic import SHAPES_ARGS, SHAPES_TEMPLATES
from vlmkit.errors import ConfigError
from vlmkit.models.registry import split_name, task_of
from vlmkit.train.config import TrainConfig, configure, make_config

# CPU recipes are tuned to learn fast from small data within minutes: a convolutional stem (far more
# sample-efficient than a linear patch projection), a short warmup, and moderate crops so that what the
# caption names stays in the picture. GPU recipes follow the published CLIP/SigLIP setups.
RECIPES: dict[str, dict[str, Any]] = {
    "clip-tiny": dict(
        model="clip-tiny",
        model_overrides={"vision.stem": "conv"},
        batch_size=128,
        lr=1e-3,
        weight_decay=0.1,
        warmup_steps=50,
        epochs=60,
        crop_scale=(0.7, 1.0),
        eval_every=100,
        save_every=200,
    ),
    "siglip-tiny": dict(
        model="siglip-tiny",
        model_overrides={"vision.stem": "conv"},
        batch_size=128,
        lr=1e-3,
        weight_decay=0.1,
        warmup_steps=50,
        epochs=60,
        crop_scale=(0.7, 1.0),
        eval_every=100,
        save_every=200,
    ),
    "clip-small": dict(
        model="clip-small",
        batch_size=128,
        lr=1e-3,
        weight_decay=0.1,
        warmup_steps=100,
        epochs=40,
        crop_scale=(0.6, 1.0),
        eval_every=200,
        save_every=500,
    ),
    "clip-B-32": dict(
        model="clip-B-32",
        batch_size=4096,
        lr=5e-4,
        weight_decay=0.2,
        warmup_steps=2000,
        epochs=32,
        crop_scale=(0.9, 1.0),
        eval_every=2000,
        save_every=1000,
        num_workers=8,
        vocab_size=49408,
    ),
    "clip-B-16": dict(
        model="clip-B-16",
        batch_size=4096,
        lr=5e-4,
        weight_decay=0.2,
        warmup_steps=2000,
        epochs=32,
        crop_scale=(0.9, 1.0),
        eval_every=2000,
        save_every=1000,
        num_workers=8,
        vocab_size=49408,
        grad_checkpointing=True,
    ),
    "siglip-B-16": dict(
        model="siglip-B-16",
        batch_size=4096,
        lr=1e-3,
        weight_decay=1e-4,
        warmup_steps=2000,
        epochs=32,
        crop_scale=(0.9, 1.0),
        eval_every=2000,
        save_every=1000,
        num_workers=8,
        vocab_size=32000,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        grad_checkpointing=True,
    ),
}

# FLIP: CLIP trained on a random half of each image's patches (twice the pairs per second), then a short
# unmasked stage at a lower learning rate that closes the gap between masked training and full-image
# evaluation (Li et al., 2023, section 3). With a time budget the stages share it 90:10.
_UNMASKED = {"vision.patch_dropout": 0.0}
RECIPES["flip-tiny"] = dict(
    RECIPES["clip-tiny"],
    model="flip-tiny",
    stages=[
        dict(name="masked", time_share=0.9),
        dict(name="unmasked", time_share=0.1, epochs=6, lr=2e-4, warmup_steps=10, init_overrides=_UNMASKED),
    ],
)
RECIPES["flip-B-16"] = dict(
    RECIPES["clip-B-16"],
    model="flip-B-16",
    stages=[
        dict(name="masked"),
        dict(name="unmasked", epochs=1, lr=5e-5, warmup_steps=200, init_overrides=_UNMASKED),
    ],
)


# Fusion encoders (ALBEF/BLIP): ITC, ITM with hard negatives, MLM and captioning on image-caption pairs. The
# tiny model is ALBEF's layout (2 text-only layers, 2 fusion layers) in pre-norm with the CPU recipes'
# convolutional stem; fp32, as tiny models train at least as fast in it on CPUs.
RECIPES["fusion-tiny"] = dict(
    model="fusion-tiny",
    model_overrides={"vision.stem": "conv"},
    batch_size=64,
    lr=5e-4,
    weight_decay=0.05,
    warmup_steps=50,
    epochs=30,
    crop_scale=(0.7, 1.0),
    eval_every=200,
    save_every=200,
    precision="fp32",
)


# The built-in shapes data for the generative recipes is the quickstart's (half the scenes hold one object,
# which makes a contrastive model learn shape as well as colour), with captions and questions about
# colour, shape, count, position, existence and relations (vlmkit.data.vqa), written on first use.
SHAPES_VQA = {**SHAPES_ARGS, "seed": 0}
# The task files both generative recipes share (vlmkit.data.vqa.write_tasks): four single-question rows per
# image, and three conversations for each training scene of several objects.
SHAPES_TASKS = dict(questions_per_image=4, multi_object_chats=3)

# The first stage of both generative recipes: clip-tiny pretrains the image tower contrastively, as the
# quickstart does; the next stage starts from its image tower.
CLIP_STAGE = dict(
    name="clip",
    recipe="clip-tiny",
    # The 192-wide towers the generative recipes were tuned and measured with (benchmarks/RESULTS.md);
    # clip-tiny itself became 128 wide later, so that the quickstart learns in minutes in fp32 too.
    model_overrides={
        "vision.width": 192,
        "vision.heads": 3,
        "text.width": 192,
        "text.heads": 3,
        "embed_dim": 192,
    },
    train_data="{data}/train.jsonl",
    zeroshot_data="{data}/classification/val",
    zeroshot_templates=SHAPES_TEMPLATES,
    time_budget=4.0,
)

# What both Flamingo recipes share: documents of up to 9 images fit 160 tokens; fp32, as tiny models train at
# least as fast in it on CPUs
FLAMINGO_SETTINGS = dict(
    batch_size=32, lr=1e-3, weight_decay=0.05, warmup_steps=50, eval_every=200, save_every=200, max_len=160,
    precision="fp32",
)  # fmt: skip

# What both flow recipes share: fp32 (tiny convolutional models train faster in it on CPUs); EMA decay 0.995, as
# a run of about 1,500 steps would still average its early weights at 0.999
FLOW_SETTINGS = dict(
    model_overrides={"ema_decay": 0.995}, batch_size=64, lr=1e-3, weight_decay=0.0, warmup_steps=100,
    eval_every=200, save_every=200, eval_limit=64, precision="fp32",
)  # fmt: skip

# Generative recipes. "{data}" in a path is the synthetic_data folder.
RECIPES |= {
    # LLaVA as it is built: a contrastively pretrained vision encoder, a projector aligned on captions,
    # then instruction tuning. Nothing pretrained can be downloaded here, so stage 1 pretrains the encoder
    # (clip-tiny, as the quickstart); stage 2 trains projector and language model on captions with the
    # encoder frozen (the language model is new too; with a pretrained one, freeze it here as LLaVA does:
    # "^language_model\\."); stage 3 tunes everything on conversations, each an image's caption and one
    # question of every type in random order, as LLaVA's instruction data asks several things about one
    # image (3x the answers per second of one question per row; with captions always last, captioning fails).
    "llava-tiny-shapes": dict(
        model="llava-tiny",
        # Image tokens are the tower's patch embeddings (hidden_states[0], before any block), 2x2 of them per
        # token. LLaVA reads the penultimate block of a deep tower; in this shallow contrastive one every block
        # mixes each patch with the whole scene, and the decoder then answers "what colour is the star?" with
        # the scene's most frequent colour, however long it trains (0.82 after 10x the steps; local
        # embeddings: 0.94 after 3x). Finding an object by its shape is learnt from scenes of several objects
        # alone, so each of those gets three conversations (multi_object_chats). benchmarks/RESULTS.md has
        # the runs. No system prompt: for a small model trained from scratch it would only cost compute.
        model_overrides={"pixel_shuffle": 2, "vision_feature_layer": 0, "chat_template": "user_assistant"},
        out="runs/llava-tiny-shapes",
        synthetic_data="data/shapes-vqa",
        synthetic_args=SHAPES_VQA,
        **SHAPES_TASKS,
        stages=[
            CLIP_STAGE,
            dict(
                name="align",
                train_data="{data}/train_captions.jsonl",
                freeze=["^vision_tower\\."],
                time_budget=2.0,
                epochs=100,
            ),
            dict(
                name="instruct",
                train_data="{data}/train_chat.jsonl",
                lr_scale={"^vision_tower\\.": 0.3},
                time_budget=8.0,
                epochs=100,
                # torch.compile: 1.45x the steps per second after under a minute of compiling (benchmarks/
                # RESULTS.md); not in the 2-minute align stage, where compiling would cost more than it saves
                compile=True,
            ),
        ],
        val_data="{data}/val_vqa.jsonl::{data}/val_captions.jsonl",
        batch_size=64,
        lr=1e-3,
        weight_decay=0.05,
        warmup_steps=50,
        eval_every=200,
        save_every=200,
        max_len=160,
    ),
    # Flamingo: the image tower pretrained contrastively (stage 1, as LLaVA's), then frozen while the
    # resampler, the gated cross-attention and the language model learn from interleaved documents of 2-9
    # scenes (vlmkit.data.fewshot): captions, questions, and novel-label documents whose made-up words only
    # the document's earlier scenes explain, so that the model learns to read labels from its context.
    # Validation: 2-way novel-label episodes with words training never saw (val_episodes.jsonl).
    "flamingo-tiny-shapes": dict(
        model="flamingo-tiny",
        out="runs/flamingo-tiny-shapes",
        synthetic_data="data/shapes-vqa",
        synthetic_args=SHAPES_VQA,
        **SHAPES_TASKS,
        stages=[
            # clip-tiny as the quickstart trains it (128 wide): Flamingo encodes every image of a document of up
            # to 9, so a tower half the width of the LLaVA recipes' buys twice the documents per second
            {k: v for k, v in CLIP_STAGE.items() if k != "model_overrides"},
            dict(
                name="interleaved",
                train_data="{data}/train_interleaved.jsonl",
                freeze=["^vision_model\\."],
                time_budget=10.0,
                epochs=100,
            ),
        ],
        val_data="{data}/val_episodes.jsonl",
        **FLAMINGO_SETTINGS,
    ),
    # DALL-E style text-to-image: the VQ-VAE image tokenizer first, then the decoder over [caption][codes] with
    # the tokenizer frozen.
    "dalle-tiny-shapes": dict(
        model="dalle-tiny",
        out="runs/dalle-tiny-shapes",
        synthetic_data="data/shapes",
        synthetic_args=SHAPES_ARGS,
        train_data="{data}/train.jsonl",
        val_data="{data}/val.jsonl",
        stages=[
            # batch 32 at twice the rate: 2x the steps in the same 5 minutes, reconstructions sharp enough for
            # the scene reader to name 0.90 of the shapes (0.70 at batch 64, lr 1e-3; benchmarks/RESULTS.md)
            dict(name="vqvae", phase="vqvae", time_budget=5.0, epochs=100, batch_size=32, lr=2e-3),
            dict(name="transformer", phase="transformer", time_budget=9.0, epochs=100),
        ],
        batch_size=64,
        lr=1e-3,
        weight_decay=0.0,
        warmup_steps=50,
        eval_every=200,
        save_every=200,
        eval_limit=64,
        precision="fp32",
    ),  # fmt: skip
    # Video (CLIP4Clip): the towers first learn still frames whose captions name positions ("a red circle on the
    # left"); then, towers frozen, the image tower embeds 8 frames of every clip once and a 2-layer temporal
    # transformer (seqTransf) learns to pool them, on the clips' captions with each clip also played backwards
    # beside the reversed caption (reversed_negatives). Through the towers end to end, 8 minutes gave the pool
    # about 200 steps and left direction and order at chance; on cached frame embeddings it gets thousands
    # (benchmarks/RESULTS.md).
    "clip-video-tiny": dict(
        RECIPES["clip-tiny"],
        task="video-contrastive",
        model_overrides={"vision.stem": "conv"},
        out="runs/clip-video-tiny",
        synthetic_data="data/moving-shapes",
        synthetic_kind="moving-shapes",
        synthetic_args={"num_train": 4000, "num_val": 400},
        train_data="{data}/train.jsonl",
        val_data="{data}/val.jsonl",
        zeroshot_data="{data}/classification/val",
        zeroshot_templates=["a {} shape."],
        num_frames=8,
        crop_scale=(0.8, 1.0),
        precision="fp32",
        stages=[
            dict(
                name="stills",
                task="contrastive",
                train_data="{data}/stills/train.jsonl",
                val_data=None,
                zeroshot_data=None,
                time_budget=4.0,
                epochs=100,
                batch_size=128,
            ),
            dict(
                name="video",
                init_overrides={"video.pool": "transformer"},
                freeze=["^visual\\.", "^text\\.", "^logit_scale"],
                frame_features=True,
                time_budget=4.0,
                epochs=60,
                batch_size=128,
                lr=1e-3,
            ),
        ],
    ),  # fmt: skip
    # Video LLaVA: each clip's 8 frames as 8 images of 16 tokens (patch embeddings, 2x2 per token, as in
    # llava-tiny-shapes) plus a learned frame-position embedding, and one question per clip: direction, order,
    # entering / leaving, count. Trained from scratch in one stage: the decoder learns to compare frames.
    "llava-video-tiny": dict(
        model="llava-tiny",
        task="llava",
        model_overrides={
            "pixel_shuffle": 2,
            "vision_feature_layer": 0,
            "chat_template": "user_assistant",
            "max_frames": 16,
            "vision.stem": "conv",
        },
        out="runs/llava-video-tiny",
        synthetic_data="data/moving-shapes",
        synthetic_kind="moving-shapes",
        synthetic_args={"num_train": 4000, "num_val": 400},
        train_data="{data}/vqa/train.jsonl",
        val_data="{data}/vqa/val.jsonl",
        num_frames=8,
        batch_size=32,
        lr=1e-3,
        weight_decay=0.05,
        warmup_steps=50,
        time_budget=15.0,
        epochs=100,
        eval_every=200,
        save_every=200,
        eval_limit=200,
        final_eval_limit=None,
        max_len=160,
        precision="fp32",
    ),  # fmt: skip
    # Flow matching: the caption condition is a CLIP's text tower, so stage 1 trains
    # clip-tiny as the quickstart does; stage 2 trains the 32 px UNet on the same scenes with that tower frozen.
    "flow-tiny-shapes": dict(
        model="flow-tiny",
        out="runs/flow-tiny-shapes",
        synthetic_data="data/shapes",
        synthetic_args=SHAPES_ARGS,
        train_data="{data}/train.jsonl",
        val_data="{data}/val.jsonl",
        stages=[
            {k: v for k, v in CLIP_STAGE.items() if k != "model_overrides"},
            dict(name="flow", time_budget=10.0, epochs=100),
        ],
        **FLOW_SETTINGS,
    ),
    # One stage on your own captions (--train-data, --val-data), conditioned on a CLIP trained on them:
    # --set text_init_from=DIR.
    "flow-tiny": dict(
        model="flow-tiny",
        out="runs/flow-tiny",
        epochs=20,
        **FLOW_SETTINGS,
    ),
    # One stage on your own interleaved documents (--train-data DOCS.jsonl); the image tower from a
    # CLIP/SigLIP folder with --set vision_init_from=DIR, frozen.
    "flamingo-tiny": dict(
        model="flamingo-tiny",
        out="runs/flamingo-tiny",
        freeze=["^vision_model\\."],
        epochs=10,
        **FLAMINGO_SETTINGS,
    ),
    # One stage on your own conversation files (--train-data, --val-data); start the image tower from a
    # CLIP/SigLIP folder with --set vision_init_from=DIR.
    "llava-tiny": dict(
        model="llava-tiny",
        model_overrides={"pixel_shuffle": 2, "chat_template": "user_assistant"},
        out="runs/llava-tiny",
        batch_size=64,
        lr=1e-3,
        weight_decay=0.05,
        warmup_steps=50,
        epochs=10,
        eval_every=200,
        save_every=200,
        max_len=128,
    ),
    "coca-tiny": dict(
        model="coca-tiny",
        out="runs/coca-tiny",
        batch_size=128,
        lr=1e-3,
        weight_decay=0.05,
        warmup_steps=50,
        epochs=10,
        eval_every=200,
        save_every=200,
        max_len=64,
    ),
    # CoCa: contrastive loss on the captions, captioning loss on captions and answers. Its image tower
    # starts from a contrastive stage, as above (CoCa itself is often initialised from CLIP).
    "coca-tiny-shapes": dict(
        model="coca-tiny",
        out="runs/coca-tiny-shapes",
        synthetic_data="data/shapes-vqa",
        synthetic_args=SHAPES_VQA,
        **SHAPES_TASKS,
        stages=[
            CLIP_STAGE,
            dict(
                name="coca",
                train_data="{data}/train_vqa.jsonl::{data}/train_captions.jsonl",
                lr_scale={"^visual\\.": 0.3},
                time_budget=8.5,
                epochs=100,
            ),
        ],
        val_data="{data}/val_vqa.jsonl::{data}/val_captions.jsonl",
        batch_size=128,
        lr=1e-3,
        weight_decay=0.05,
        warmup_steps=50,
        eval_every=200,
        save_every=200,
        max_len=64,
    ),
}


# On the built-in shapes data, with held-out images for retrieval, zero-shot and the compositional benchmark
# (val_compositional.jsonl: true captions against attribute swaps and other foils). As ALBEF and BLIP start
# from a pretrained ViT, stage 1 pretrains the image tower contrastively (the quickstart's clip-tiny, 4 min);
# stage 2 trains the fusion model from it with ITC, ITM and MLM (the captioning decoder costs a third more
# per step and serves no target here: `--set model_overrides.text_decoder=true
# --set model_overrides.caption_weight=1` adds it). Each training scene's true caption and a foil of it, in
# the same words (train_compositional.jsonl), are extra ITM examples (`hard_negatives`, NegCLIP's idea): the
# mined negatives rarely differ from the positive only by which object has which colour. (Foils alone, as
# negatives beside the varied training captions, taught ITM their wording instead.) benchmarks/RESULTS.md
# has the runs.
RECIPES["fusion-tiny-shapes"] = dict(
    RECIPES["fusion-tiny"],
    model_overrides={"text_decoder": False, "caption_weight": 0.0},
    out="runs/fusion-tiny-shapes",
    synthetic_data="data/shapes-vqa",
    synthetic_args=SHAPES_VQA,
    **SHAPES_TASKS,
    stages=[
        dict(
            name="clip",
            recipe="clip-tiny",
            train_data="{data}/train.jsonl",
            zeroshot_data="{data}/classification/val",
            zeroshot_templates=SHAPES_TEMPLATES,
            time_budget=4.0,
        ),
        dict(name="fusion", time_budget=8.5, lr_scale={"^visual\\.": 0.3}),
    ],
    train_data="{data}/train.jsonl",
    val_data="{data}/val.jsonl",
    zeroshot_data="{data}/classification/val",
    zeroshot_templates=SHAPES_TEMPLATES,
    compositional_data="{data}/val_compositional.jsonl",
    hard_negatives="{data}/train_compositional.jsonl",
)


def list_recipes() -> list[str]:
    return list(RECIPES)


def get_recipe(name: str, **overrides: Any) -> TrainConfig:
    """The recipe's config with `overrides` (flat names, tree paths or dotted `model_overrides.x`) applied."""
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; known recipes: {', '.join(list_recipes())}")
    cfg = make_config(RECIPES[name])
    return configure(cfg, overrides, where=f"recipe {name}")


# A tiny model of each kind of family for smoke runs: model-config overrides
_SMOKE_MODELS: dict[str, dict[str, Any]] = {
    "contrastive": {
        "vision.image_size": 32,
        "vision.layers": 1,
        "text.layers": 1,
        "vision.width": 64,
        "text.width": 64,
        "vision.heads": 2,
        "text.heads": 2,
        "text.context_length": 16,
        "embed_dim": 32,
    },
    "fusion": {
        "vision.image_size": 32,
        "vision.layers": 1,
        "vision.width": 64,
        "vision.heads": 2,
        "text.layers": 2,
        "text.fusion_start": 1,
        "text.width": 64,
        "text.heads": 2,
        "text.context_length": 16,
        "embed_dim": 32,
    },
    "generative": {
        "vision.image_size": 32,
        "vision.layers": 2,
        "vision.width": 64,
        "vision.heads": 2,
        "decoder.width": 64,
        "decoder.layers": 2,
        "decoder.heads": 2,
    },
    "dalle": {  # 32 px -> 4x4 codes
        "vqvae.image_size": 32,
        "vqvae.channels": (8, 16, 32),
        "vqvae.codebook_size": 32,
        "vqvae.code_dim": 8,
        "decoder.width": 64,
        "decoder.layers": 2,
        "decoder.heads": 2,
        "decoder.max_seq_len": 64,
        "max_text_len": 32,
    },
    "flow": {"net.image_size": 32, "net.channels": (8, 16), "net.embed_dim": 32},
}


def smoke(cfg: TrainConfig) -> TrainConfig:
    """A seconds-long version of any recipe: a tiny model and a few steps (big_vision's `runlocal`)."""
    family = split_name(cfg.model.name)[0]
    kind = task_of(cfg.model.name)
    contrastive = kind in ("contrastive", "fusion")  # image-caption pairs
    small = dict(_SMOKE_MODELS.get(kind, _SMOKE_MODELS["generative"]))
    if family == "siglip":
        small["embed_dim"] = 64  # the vision tower has no projection: its width is the embedding
    if family == "coca":
        small.update({"embed_dim": 32, "decoder.cross_attention_start": 1, "decoder.encoder_width": 64})
    if family == "flamingo":
        small.update({"perceiver.latents": 4, "perceiver.depth": 1})
    steps = {"max_steps": 3, "time_budget": None, "compile": False}  # compiling takes longer than 3 steps
    stages = [{**{k: v for k, v in stage.items() if k != "batch_size"}, **steps,
               **({"smoke": True} if "recipe" in stage else {})} for stage in cfg.stages]  # fmt: skip
    changes: dict[str, Any] = {
        "model": f"{family}-tiny",
        "model_overrides": {**cfg.model.overrides, **small},
        "stages": stages,
        "batch_size": 8,
        "warmup_steps": 2,
        "log_every": 1,
        "num_workers": 0,
        "grad_checkpointing": False,
    }
    if cfg.data.synthetic:
        synthetic = {**cfg.data.synthetic_args, "num_train": 48, "num_val": 8, "image_size": 32}
        if cfg.data.synthetic_kind == "moving-shapes":
            synthetic.update(num_classification=2)
        else:
            synthetic.update(num_per_class_train=1, num_per_class_val=1)
        changes.update(synthetic_args=synthetic, synthetic_data=f"{cfg.data.synthetic}-smoke")
    if contrastive:
        changes.update(max_steps=6, eval_every=3, save_every=3, vocab_size=512)
    else:
        changes.update(
            max_steps=3,
            time_budget=None,
            warmup_steps=1,
            eval_every=0,
            save_every=2,
            vocab_size=300,
            eval_limit=8,
            final_eval_limit=8,
            eval_batch_size=8,
            max_len=256,  # a 300-token vocabulary spells words out in bytes
        )
    return configure(cfg, changes)

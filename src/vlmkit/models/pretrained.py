"""Save and load a model folder: weights (safetensors), config (JSON), tokenizer and preprocessing.

A vlmkit model folder (a finished training run, or any checkpoint inside one) holds:
    model.safetensors   weights
    config.json         {"vlmkit_version", "model_name", "family", "model": <config>}; family is "clip"
                        (CLIP and SigLIP; the default for folders without it), "coca" or "llava"
    tokenizer.json      the Hugging Face `tokenizers` file the model was trained with
    preprocess.json     image size, mean/std, resize mode

`vlmkit.convert.load_pretrained` reads these and Hugging Face CLIP / SigLIP / LLaVA folders (a `config.json`
with "model_type"), so every command that takes `--model` accepts either kind.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import vlmkit
from vlmkit.config import atomic_write_text, from_dict, load_json, save_json
from vlmkit.errors import ConfigError

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
PREPROCESS = "preprocess.json"


@dataclass
class Pretrained:
    model: torch.nn.Module  # CLIP (CLIP/SigLIP), CoCa or Llava
    tokenizer: object  # vlmkit.data.tokenizer.Tokenizer
    preprocess: object  # vlmkit.data.transforms.PreprocessConfig
    name: str


def save_tensors(state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Write `state` (contiguous CPU tensors) as safetensors to a temporary file beside `path`, then rename it:
    readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(path)


def save_weights(
    model: torch.nn.Module, path: str | Path, state: dict[str, torch.Tensor] | None = None
) -> None:
    """Atomically write a model's state dict (or `state`) as safetensors (contiguous, de-duplicated tensors)."""
    state = unwrap(model).state_dict() if state is None else state
    save_tensors({k: v.detach().contiguous().cpu() for k, v in state.items()}, path)


def save_pretrained(
    model: torch.nn.Module,
    out_dir: str | Path,
    tokenizer=None,
    preprocess=None,
    name: str = "",
    state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a loadable model folder (see module docstring); `state`: the weights, when the model's own are
    sharded across processes. Returns the folder."""
    from vlmkit.models.registry import model_family

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = unwrap(model)
    save_weights(model, out / WEIGHTS, state)
    meta = {
        "vlmkit_version": vlmkit.__version__,
        "model_name": name,
        "family": model_family(model.cfg),
        "model": model.cfg,
    }
    save_json(meta, out / CONFIG)
    if tokenizer is not None:
        tokenizer.save(out / TOKENIZER)
    if preprocess is not None:
        atomic_write_text(out / PREPROCESS, _json(preprocess.to_dict()))
    return out


def _json(d: dict) -> str:
    import json

    return json.dumps(d, indent=2) + "\n"


def is_vlmkit_dir(path: str | Path) -> bool:
    """True for a folder with vlmkit's weights and config.json."""
    path = Path(path)
    return (path / WEIGHTS).is_file() and (path / CONFIG).is_file()


def load_vlmkit(path: str | Path, meta: dict, device: str | torch.device = "cpu") -> Pretrained:
    """Load a vlmkit model folder whose config.json holds `meta`: model (eval mode), tokenizer and
    preprocessing config. (`vlmkit.convert.load_pretrained` reads Hugging Face folders too.)"""
    from vlmkit.data.tokenizer import Tokenizer
    from vlmkit.data.transforms import PreprocessConfig

    path = Path(path)
    if not is_vlmkit_dir(path):
        raise ConfigError(f"{path} is not a model folder: expected {WEIGHTS} and {CONFIG} in it")
    if not isinstance(meta, dict) or "model" not in meta:
        raise ConfigError(f"{path / CONFIG}: no 'model' key; is this a vlmkit model folder?")
    from vlmkit.models.registry import build_model, config_class

    try:
        cls = config_class(meta.get("family", "clip"))
    except ConfigError as e:
        raise ConfigError(f"{path / CONFIG}: {e}") from None
    cfg = from_dict(cls, meta["model"], where=str(path / CONFIG))
    model = build_model(cfg)
    state = load_file(str(path / WEIGHTS))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(
            f"{path / WEIGHTS} does not fit {path / CONFIG}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}"
        )
    model.to(device).eval()
    tokenizer = Tokenizer.from_file(path / TOKENIZER) if (path / TOKENIZER).is_file() else None
    vocab = (cfg.decoder if hasattr(cfg, "decoder") else cfg.text).vocab_size  # generative or two-tower
    if tokenizer is not None and tokenizer.vocab_size > vocab:
        raise ConfigError(
            f"{path / TOKENIZER} has {tokenizer.vocab_size} tokens but the model's vocabulary is {vocab}"
        )
    if (path / PREPROCESS).is_file():
        preprocess = PreprocessConfig.from_dict(load_json(path / PREPROCESS))
    else:
        preprocess = PreprocessConfig(image_size=cfg.vision.image_size)
        logging.getLogger("vlmkit").warning(
            "%s has no %s: images are resized to %d px and normalised with CLIP's mean and std; if the model "
            "was trained otherwise its results will be off (save_pretrained writes the file)",
            path,
            PREPROCESS,
            preprocess.image_size,
        )
    return Pretrained(model, tokenizer, preprocess, meta.get("model_name") or path.name)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model inside DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model

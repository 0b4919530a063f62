"""Hugging Face <-> vlmkit: one adapter per family (clip.py: CLIP and SigLIP; llama.py: the Llama decoder;
llava.py: LLaVA), and `load_pretrained`, which reads a model folder of either kind.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vlmkit.config import load_json
from vlmkit.errors import ConfigError
from vlmkit.models.pretrained import CONFIG, WEIGHTS, Pretrained, is_vlmkit_dir, load_vlmkit


def is_model_dir(path: str | Path) -> bool:
    """True for a vlmkit model folder or a Hugging Face CLIP/SigLIP/LLaVA folder (config.json + weights)."""
    from vlmkit.convert.clip import is_hf_dir

    return is_vlmkit_dir(path) or is_hf_dir(Path(path))


def load_pretrained(path: str | Path, device: str | torch.device = "cpu") -> Pretrained:
    """Load a model folder, vlmkit's or Hugging Face's: model (eval mode), tokenizer and preprocessing config."""
    from vlmkit.convert.clip import load_hf

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"model folder not found: {path}")
    if not (path / CONFIG).is_file():
        raise ConfigError(f"{path} is not a model folder: expected {CONFIG} and {WEIGHTS} in it")
    meta = load_json(path / CONFIG)
    if isinstance(meta, dict) and "model_type" in meta and "model" not in meta:
        return load_hf(path, device)  # a Hugging Face folder
    return load_vlmkit(path, meta, device)


__all__ = ["Pretrained", "is_model_dir", "load_pretrained"]

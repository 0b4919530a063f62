"""Transfer learning: what to train of a pretrained model, WiSE-FT, and classification data as captions.

The trainer does the fine-tuning itself (`TrainConfig.init_from` and friends); this module holds
- `prepare_model`: freezing by regular expressions, locked-image tuning (LiT) and LoRA adapters;
- `wise_ft`: weight-space interpolation between a zero-shot and a fine-tuned model (`vlmkit wise-ft`);
- `imagefolder_to_manifest`: an ImageFolder as an image-caption manifest, captions from class names and
  templates, so classification data is fine-tuned with the pretraining loss ("finetune like you
  pretrain", FLYP) (`vlmkit data manifest-from-folder`).
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from vlmkit.config import atomic_write_text, to_dict
from vlmkit.errors import ConfigError, DataError, VlmkitError
from vlmkit.nn.lora import (
    DEFAULT_TARGETS,
    adapted_modules,
    add_lora,
    compile_regex,
    find_targets,
    load_lora_state_dict,
    lora_state_dict,
)

# ---------------------------------------------------------------------------------------------- what trains


@dataclass
class TransferSetup:
    """What `prepare_model` did: parameter counts and names."""

    trainable: int  # parameters (elements) with requires_grad
    total: int
    frozen: list[str] = field(default_factory=list)  # frozen by `freeze` / `lock_image`
    lora: list[str] = field(default_factory=list)  # adapted Linear modules


def _matching(names: list[str], patterns: list[str], key: str) -> set[str]:
    """The names any pattern matches (re.search); a pattern that matches none is a ConfigError naming it."""
    out: set[str] = set()
    for pattern in patterns:
        regex = compile_regex(pattern, key)
        hits = {n for n in names if regex.search(n)}
        if not hits:
            raise ConfigError(
                f"{key} {pattern!r} matches no parameter name; names look like {names[0]!r} "
                "(see model.named_parameters())"
            )
        out |= hits
    return out


def prepare_model(
    model: nn.Module,
    freeze: list[str] | None = None,
    lock_image: bool = False,
    lora_rank: int = 0,
    lora_alpha: float | None = None,
    lora_targets: str = DEFAULT_TARGETS,
    lora_also_train: list[str] | None = None,
) -> TransferSetup:
    """Decide in place which parameters of a CLIP `model` train; returns what was done.

    - `freeze`: regexes over parameter names (re.search); matches get requires_grad False.
    - `lock_image`: LiT, every parameter of the image tower (`visual.`) is frozen. (The trainer also keeps
      the tower in eval mode.)
    - `lora_rank` > 0: the Linears `lora_targets` matches (outside the frozen ones) get LoRA adapters and
      every other parameter is frozen, except those `lora_also_train` (regexes) matches.
    Raises ConfigError for a pattern that matches nothing, LoRA on a non-Linear, or nothing left to train.
    """
    names = [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    frozen = _matching(names, list(freeze or []), "freeze")
    if lock_image:
        frozen |= {n for n in names if n.startswith("visual.")}
    for name in frozen:
        params[name].requires_grad_(False)
    adapted: list[str] = []
    if lora_rank:
        targets = find_targets(model, lora_targets)
        keep = [t for t in targets if f"{t}.weight" not in frozen]
        if not keep:
            raise ConfigError(
                f"lora_targets {lora_targets!r} matches only frozen layers (freeze / lock_image); "
                "adapt layers that are not frozen"
            )
        also = _matching(names, list(lora_also_train or []), "lora_also_train")
        for name, p in params.items():
            p.requires_grad_(name in also and name not in frozen)
        adapted = add_lora(model, rank=lora_rank, alpha=lora_alpha, names=keep)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if not trainable:
        raise ConfigError("nothing left to train: freeze / lock_image freeze every parameter")
    total = sum(p.numel() for p in model.parameters())
    return TransferSetup(trainable, total, sorted(frozen), adapted)


# ---------------------------------------------------------------------------------------------- LoRA checkpoints

# A LoRA run's checkpoint holds merged weights in model.safetensors (so it loads like any model folder)
# and the adapters alone in this file. Resuming rebuilds the base weights as the run built them (from
# init_from, or the seeded initialisation), puts the adapters back, and checks base + adapters against
# the merged weights.
LORA_FILE = "lora.safetensors"


def save_lora(model: nn.Module, folder: str | os.PathLike) -> Path:
    """Write `model`'s LoRA adapters (`lora_state_dict`) to `folder/lora.safetensors`, atomically."""
    from vlmkit.models.pretrained import save_tensors

    path = Path(folder) / LORA_FILE
    save_tensors({k: v.detach().contiguous().cpu() for k, v in lora_state_dict(model).items()}, path)
    return path


@torch.no_grad()
def restore_lora(model: nn.Module, merged: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Load a LoRA checkpoint into the adapted `model` in place.

    `merged` is the checkpoint's plain state dict (adapters merged): unadapted tensors are copied from
    it; adapters come from `path` (lora.safetensors), and base weight + adapter must reproduce the
    merged weight, else the base weights changed since the checkpoint was written (VlmkitError).
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise VlmkitError(
            f"cannot resume from {path.parent}: no {LORA_FILE} (the LoRA adapters; its write was interrupted?); "
            "delete that checkpoint folder to use an older one"
        )
    load_lora_state_dict(model, load_file(str(path)), where=str(path))
    weights = {f"{name}.weight": m for name, m in adapted_modules(model).items()}
    own = model.state_dict()
    for key, value in merged.items():
        if key not in weights:
            own[key].copy_(value)
        elif not torch.allclose(
            weights[key].weight, value.to(weights[key].weight.device), rtol=1e-4, atol=1e-6
        ):
            raise VlmkitError(
                f"cannot resume from {path.parent}: base weight + LoRA adapter of {key} differs from the "
                "checkpoint's merged weight; the base model (init_from) changed since the checkpoint was written"
            )


# ---------------------------------------------------------------------------------------------- train flags


# ---------------------------------------------------------------------------------------------- WiSE-FT


def _first_difference(a, b, where: str = "") -> str:
    """The first dotted key where two nested dicts differ, as 'key: a vs b'."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{where}.{key}" if where else key)
    return f"{where}: {a!r} vs {b!r}"


def _load_pair(zeroshot_dir, finetuned_dir, device="cpu"):
    from vlmkit.convert import load_pretrained

    zs, ft = load_pretrained(zeroshot_dir, device), load_pretrained(finetuned_dir, device)
    a, b = to_dict(zs.model.cfg), to_dict(ft.model.cfg)
    if a != b:
        raise ConfigError(
            f"{zeroshot_dir} and {finetuned_dir} have different model configs ({_first_difference(a, b)}); "
            "WiSE-FT interpolates two models of one architecture: fine-tune with --init-from the zero-shot model"
        )
    return zs, ft


def _check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"WiSE-FT alpha must be in [0, 1] (0 = zero-shot, 1 = fine-tuned), not {alpha:g}")
    return alpha


@torch.no_grad()
def interpolate_weights(
    zeroshot: dict[str, torch.Tensor], finetuned: dict[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """(1 - alpha) * zeroshot + alpha * finetuned for every floating tensor (computed in float64, stored in
    the fine-tuned dtype); other tensors are the fine-tuned model's."""
    alpha = _check_alpha(alpha)
    out = {}
    for key, ft in finetuned.items():
        zs = zeroshot[key]
        if ft.is_floating_point():
            out[key] = ((1.0 - alpha) * zs.double() + alpha * ft.double()).to(ft.dtype)
        else:
            out[key] = ft.clone()
    return out


def _write_interpolated(zs, ft, alpha: float, out: Path) -> Path:
    from vlmkit.models.pretrained import save_pretrained

    state = interpolate_weights(zs.model.state_dict(), ft.model.state_dict(), alpha)
    with torch.device("meta"):  # no second initialisation: the weights are assigned below
        model = type(ft.model)(ft.model.cfg)
    model.load_state_dict(state, assign=True)
    return save_pretrained(model, out, ft.tokenizer, ft.preprocess, name=f"wise-ft alpha={alpha:g}")


def _check_out(out: Path, *inputs) -> None:
    for d in inputs:
        if out.resolve() == Path(d).resolve():
            raise ConfigError(f"--out {out} is an input model folder; write the interpolated model elsewhere")


def wise_ft(
    zeroshot_dir: str | os.PathLike, finetuned_dir: str | os.PathLike, alpha: float, out: str | os.PathLike
) -> Path:
    """WiSE-FT: write theta = (1 - alpha) * zero-shot + alpha * fine-tuned as a model folder at `out`.

    Both folders are loaded with `load_pretrained` (vlmkit runs or Hugging Face folders) and must share one
    model config. Tokenizer and preprocessing are the fine-tuned run's. alpha 0 gives the zero-shot model,
    1 the fine-tuned one. Returns `out`.
    """
    alpha, out = _check_alpha(alpha), Path(out)
    _check_out(out, zeroshot_dir, finetuned_dir)
    zs, ft = _load_pair(zeroshot_dir, finetuned_dir)
    return _write_interpolated(zs, ft, alpha, out)


def wise_ft_sweep(
    zeroshot_dir: str | os.PathLike,
    finetuned_dir: str | os.PathLike,
    alphas: list[float],
    out: str | os.PathLike,
    eval_data: str | os.PathLike | None = None,
    templates: list[str] | None = None,
    device: str | torch.device = "cpu",
) -> list[dict]:
    """WiSE-FT for several alphas: one folder `out/alpha_<a>` each (just `out` for a single alpha).

    With `eval_data` (an ImageFolder) also the zero-shot accuracy of each. Returns one row per alpha:
    {"alpha", "path"[, "acc1", "mean_per_class_recall"]}; also written to `out/wise_ft.json`.
    """
    alphas = [_check_alpha(a) for a in alphas]
    if not alphas:
        raise ConfigError("no --alpha given; pass one or more, e.g. --alpha 0.5")
    out = Path(out)
    _check_out(out, zeroshot_dir, finetuned_dir)
    zs, ft = _load_pair(zeroshot_dir, finetuned_dir)
    rows = []
    for alpha in alphas:
        path = out if len(alphas) == 1 else out / f"alpha_{alpha:.2f}"
        _write_interpolated(zs, ft, alpha, path)
        row = {"alpha": alpha, "path": str(path)}
        if eval_data is not None:
            row.update(zeroshot_accuracy(path, eval_data, templates, device))
        rows.append(row)
    atomic_write_text(out / "wise_ft.json", json.dumps(rows, indent=2) + "\n")
    return rows


def zeroshot_accuracy(
    model_dir: str | os.PathLike,
    data: str | os.PathLike,
    templates: list[str] | None = None,
    device: str | torch.device = "cpu",
) -> dict:
    """{"acc1", "mean_per_class_recall"} of the model folder's zero-shot classifier on an ImageFolder."""
    from vlmkit.convert import load_pretrained
    from vlmkit.eval.templates import load_templates
    from vlmkit.eval.zeroshot import evaluate_zeroshot

    pt = load_pretrained(model_dir, device)
    if pt.tokenizer is None:
        raise ConfigError(f"{model_dir} has no tokenizer.json; zero-shot evaluation needs one")
    metrics = evaluate_zeroshot(
        pt.model, pt.tokenizer, pt.preprocess, data, templates=load_templates(templates), device=device
    )["metrics"]
    return {"acc1": metrics["acc1"], "mean_per_class_recall": metrics["mean_per_class_recall"]}


# ---------------------------------------------------------------------------------------------- ImageFolder -> manifest


def imagefolder_to_manifest(
    folder: str | os.PathLike,
    templates: list[str] | None,
    out_path: str | os.PathLike,
    classes_file: str | os.PathLike | None = None,
    positional_classes: bool = False,
) -> Path:
    """Write a JSONL manifest with one row per image of an ImageFolder: {"image", "caption", "label", "class"}.

    The caption is a template (templates or template files, see `load_templates`; None = the defaults)
    filled with the class name; which template is a function of the image's path inside `folder`, so the
    manifest is the same on every run. Image paths are relative to the manifest's folder. Every image is
    decoded first: one that fails is left out, and logged with its reason. Returns the path.
    """
    import logging
    from collections import Counter

    from vlmkit.data.manifest import read_image_folder
    from vlmkit.data.transforms import ImageDecodeError, load_image
    from vlmkit.eval.templates import load_templates

    log = logging.getLogger("vlmkit.data")

    templates = load_templates(templates)
    root = Path(folder)
    paths, labels, classnames = read_image_folder(
        root, classes_file=classes_file, positional_classes=positional_classes
    )
    if not paths:
        raise DataError(f"{root} has class folders but no images in them")
    out_path = Path(out_path)
    base = out_path.parent.resolve()
    lines, skipped = [], Counter()
    for path, label in zip(paths, labels):
        try:
            load_image(path)
        except ImageDecodeError as e:
            log.warning("skipped %s", e)
            skipped[e.reason.split(":")[0].split(" (")[0]] += 1
            continue
        key = path.relative_to(root).as_posix()
        template = templates[zlib.crc32(key.encode()) % len(templates)]
        row = {
            "image": Path(os.path.relpath(path.resolve(), base)).as_posix(),
            "caption": template.replace("{}", classnames[label]),
            "label": label,
            "class": classnames[label],
        }
        lines.append(json.dumps(row))
    if skipped:
        log.warning("%s: %d images left out of %s (they do not decode): %s", root, sum(skipped.values()),
                    out_path, dict(skipped))  # fmt: skip
    if not lines:
        raise DataError(f"{root}: none of its {len(paths)} images decodes")
    atomic_write_text(out_path, "\n".join(lines) + "\n")
    return out_path


__all__ = [
    "TransferSetup",
    "imagefolder_to_manifest",
    "interpolate_weights",
    "prepare_model",
    "wise_ft",
    "wise_ft_sweep",
    "zeroshot_accuracy",
]

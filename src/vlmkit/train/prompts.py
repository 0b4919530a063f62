"""Prompt learning (CoOp / CoCoOp) on a frozen dual encoder, evaluated base-to-new.

The image tower is frozen, so every image is embedded once and the prompts train on those embeddings: an epoch
over 16 shots of 15 classes is a few text-tower passes. Base-to-new (CoCoOp's protocol): the classes are split
in two (by default the first half of the sorted class names are base), the prompts learn from K shots per base
class, and accuracy is measured on held-out images of the base classes and of the new ones, against the best
hand-made templates (forward-selected on the same K shots) and the harmonic mean of the two.

This is not a task of the one Trainer: with both towers frozen and the images embedded once, the prompts train in
seconds on cached embeddings, and the Trainer's manifest data, stages, checkpoints and parallelism would add
nothing but the cost of re-encoding every image at every step.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from vlmkit.errors import ConfigError, DataError
from vlmkit.models.prompt_learner import PromptConfig, PromptLearner

log = logging.getLogger("vlmkit.train")


def few_shot_indices(labels: list[int], shots: int, seed: int = 0) -> list[int]:
    """`shots` indices per class, drawn without replacement with a seeded generator; a class with fewer images is
    an error naming it."""
    g = torch.Generator().manual_seed(seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    out = []
    for y in sorted(by_class):
        idx = by_class[y]
        if len(idx) < shots:
            raise DataError(f"class {y} has {len(idx)} training images, fewer than {shots} shots")
        out += [idx[int(j)] for j in torch.randperm(len(idx), generator=g)[:shots]]
    return out


def fit_prompts(
    learner: PromptLearner,
    features: Tensor,
    labels: Tensor,
    *,
    epochs: int = 50,
    lr: float = 2e-3,
    batch_size: int = 32,
    seed: int = 0,
) -> list[float]:
    """CoOp's optimisation on unit-norm image embeddings (N, D) and class indices (N,): SGD with momentum 0.9,
    a cosine schedule, cross-entropy over the learner's classes. Returns the mean loss of each epoch."""
    params = learner.trainable_parameters()
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    steps = epochs * math.ceil(len(labels) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(seed)
    history = []
    for _ in tqdm(range(epochs), desc="prompt epochs", leave=False):
        order = torch.randperm(len(labels), generator=g)
        total = 0.0
        for start in range(0, len(labels), batch_size):
            idx = order[start : start + batch_size]
            loss = F.cross_entropy(learner(features[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        history.append(total / len(labels))
    return history


@torch.no_grad()
def prompt_accuracy(learner: PromptLearner, features: Tensor, labels: Tensor, batch_size: int = 64) -> float:
    hits = 0
    for start in range(0, len(labels), batch_size):
        logits = learner(features[start : start + batch_size])
        hits += int((logits.argmax(1) == labels[start : start + batch_size]).sum())
    return hits / max(1, len(labels))


def class_subset(
    features: Tensor, labels: Tensor, names: list[str], chosen: list[str]
) -> tuple[Tensor, Tensor]:
    """The rows of `chosen` classes (names), relabelled by their index in `chosen`."""
    keep = [i for i, lab in enumerate(labels.tolist()) if names[lab] in chosen]
    return features[keep], torch.tensor([chosen.index(names[lab]) for lab in labels[keep].tolist()])


def _encode_folder(clip, preprocess, folder, device, classes_file=None):
    from vlmkit.data.manifest import read_image_folder
    from vlmkit.data.transforms import ImageTransform
    from vlmkit.eval.features import encode_labelled_images

    paths, labels, names = read_image_folder(folder, classes_file=classes_file)
    data = encode_labelled_images(
        clip, paths, labels, names, ImageTransform(preprocess, train=False), 64, device
    )
    return data.features, data.labels, names


def base_to_new(
    clip,
    tokenizer,
    preprocess,
    train_folder: str | Path,
    test_folder: str | Path,
    cfg: PromptConfig,
    *,
    base_classes: list[str] | None = None,
    shots: int = 16,
    epochs: int = 50,
    lr: float = 2e-3,
    templates: list[str] | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> dict:
    """Learn prompts on `shots` images per base class of `train_folder`; accuracy on `test_folder`'s base and new
    classes, beside the hand templates forward-selected on the same shots. Returns the metrics and the learner."""
    from vlmkit.eval.prompts import accuracy, class_embeddings, ensemble, forward_selection
    from vlmkit.eval.templates import load_templates

    clip = clip.eval().to(device)
    tr_f, tr_y, names = _encode_folder(clip, preprocess, train_folder, device)
    te_f, te_y, te_names = _encode_folder(clip, preprocess, test_folder, device)
    if te_names != names:
        raise DataError(f"{train_folder} and {test_folder} name different classes")
    base = list(base_classes) if base_classes else names[: len(names) // 2]
    unknown = [c for c in base if c not in names]
    if unknown:
        raise ConfigError(
            f"base classes {unknown} are not classes of {train_folder} (its classes: {names[:6]} ...)"
        )
    new = [c for c in names if c not in base]
    if not new:
        raise ConfigError("every class is a base class: leave some out to measure new classes")

    b_tr_f, b_tr_y = class_subset(tr_f, tr_y, names, base)
    pick = few_shot_indices(b_tr_y.tolist(), shots, seed)
    b_tr_f, b_tr_y = b_tr_f[pick], b_tr_y[pick]
    b_te_f, b_te_y = class_subset(te_f, te_y, names, base)
    n_te_f, n_te_y = class_subset(te_f, te_y, names, new)

    # the hand-made baseline: templates forward-selected on the same shots
    templates = load_templates(templates or ["imagenet80"])
    emb_base = class_embeddings(clip, tokenizer, base, templates, device)
    chosen = forward_selection(b_tr_f, b_tr_y, emb_base)["chosen"]
    emb_new = class_embeddings(clip, tokenizer, new, templates, device)

    hand = {
        "base": accuracy(b_te_f, b_te_y, ensemble(emb_base[chosen])),
        "new": accuracy(n_te_f, n_te_y, ensemble(emb_new[chosen])),
    }
    torch.manual_seed(seed)
    learner = PromptLearner(clip, tokenizer, base, cfg).to(device)
    history = fit_prompts(learner, b_tr_f, b_tr_y, epochs=epochs, lr=lr, seed=seed)
    learned = {"base": prompt_accuracy(learner, b_te_f, b_te_y)}
    if not cfg.per_class:
        learned["new"] = prompt_accuracy(learner.with_classes(new), n_te_f, n_te_y)

    def harmonic(r):
        return (
            2 * r["base"] * r["new"] / (r["base"] + r["new"])
            if r.get("new") is not None and r["base"] + r["new"]
            else None
        )

    metrics = {
        "base_classes": base, "new_classes": new, "shots": shots, "epochs": epochs,
        "hand_templates": [templates[k] for k in chosen],
        "hand": {**hand, "harmonic": harmonic(hand)},
        "learned": {**learned, "harmonic": harmonic(learned)},
        "loss": history,
    }  # fmt: skip
    return {"metrics": metrics, "learner": learner}


def save_prompts(
    learner: PromptLearner, out: str | Path, clip_dir: str | Path, metrics: dict | None = None
) -> Path:
    """`out`/prompts.safetensors (the context, the meta-network) and prompts.json (the config, the classes, the
    dual encoder's folder, the metrics). Returns the folder."""
    import dataclasses
    import json

    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {"ctx": learner.ctx.detach().cpu().contiguous()}
    if learner.meta_net is not None:
        tensors |= {
            f"meta_net.{k}": v.detach().cpu().contiguous() for k, v in learner.meta_net.state_dict().items()
        }
    save_file(tensors, out / "prompts.safetensors")
    meta = {"clip": str(Path(clip_dir).resolve()), "config": dataclasses.asdict(learner.cfg),
            "classnames": learner.classnames, "metrics": metrics or {}}  # fmt: skip
    (out / "prompts.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return out


def load_prompts(path: str | Path, device: str | torch.device = "cpu", classnames: list[str] | None = None):
    """A saved prompt learner on its dual encoder (loaded from the folder prompts.json names), for its own classes
    or `classnames` (a shared context only). Returns (learner, Pretrained)."""
    import json

    from safetensors.torch import load_file

    from vlmkit.convert import load_pretrained

    path = Path(path)
    if not (path / "prompts.json").is_file() or not (path / "prompts.safetensors").is_file():
        raise DataError(
            f"{path}: not a prompts folder (prompts.json and prompts.safetensors; vlmkit train --task prompt-learning writes them)"
        )
    meta = json.loads((path / "prompts.json").read_text(encoding="utf-8"))
    pt = load_pretrained(meta["clip"], device)
    tensors = load_file(path / "prompts.safetensors")  # safetensors: no pickle
    learner = PromptLearner(pt.model, pt.tokenizer, meta["classnames"], PromptConfig(**meta["config"]))
    with torch.no_grad():
        learner.ctx.copy_(tensors["ctx"])
        if learner.meta_net is not None:
            learner.meta_net.load_state_dict(
                {k[len("meta_net.") :]: v for k, v in tensors.items() if k.startswith("meta_net.")}
            )
    learner = learner.to(device).eval()
    if classnames is not None:
        learner = learner.with_classes(classnames)
    return learner, pt


__all__ = [
    "base_to_new",
    "few_shot_indices",
    "fit_prompts",
    "load_prompts",
    "prompt_accuracy",
    "save_prompts",
]

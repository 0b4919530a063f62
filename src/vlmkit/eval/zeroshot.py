"""Zero-shot image classification: classify images by their similarity to embedded class prompts.

Each class is embedded once through a prompt ensemble (every template, normalised, averaged,
re-normalised, as in CLIP), giving a (D, C) linear classifier over L2-normalised image features.
"""

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from vlmkit.data.manifest import read_image_folder
from vlmkit.data.transforms import ImageTransform, PreprocessConfig
from vlmkit.errors import ConfigError
from vlmkit.eval.features import encode_labelled_images, extract_text_features, result_dict
from vlmkit.eval.report import new_figure, save_figure, show_image
from vlmkit.eval.templates import load_templates

Tokenizer = Callable[[list[str]], torch.Tensor]

NUM_EXAMPLES = 8  # images in zeroshot_examples.png
MAX_LABELLED_CLASSES = 40  # beyond this, class names on the confusion-matrix axes are unreadable


@torch.no_grad()
def build_zeroshot_classifier(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    classnames: Sequence[str],
    templates: Sequence[str],
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    bf16: bool = False,
) -> torch.Tensor:
    """Embed every class through every template; returns the unit-norm class embeddings as (D, C)."""
    if not templates:
        raise ConfigError("no zero-shot templates given; pass at least one, e.g. 'a photo of a {}.'")
    texts = [template.replace("{}", name) for name in classnames for template in templates]  # class-major
    features = extract_text_features(model, tokenizer, texts, batch_size, device, bf16)  # (C*K, D), unit norm
    features = features.view(len(classnames), len(templates), -1).mean(dim=1)  # (C, D)
    return F.normalize(features, dim=-1).T.contiguous()  # (D, C)


def zeroshot_logits(image_features: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each image (N, D) to each class of `classifier` (D, C) -> (N, C)."""
    image_features = F.normalize(image_features.float(), dim=-1)  # (N, D)
    return image_features @ classifier.to(image_features.device, torch.float32)  # (N, C)


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Counts (C, C): row = true class, column = predicted class."""
    flat = labels.long() * num_classes + predictions.long()  # (N,)
    return torch.bincount(flat, minlength=num_classes**2).view(num_classes, num_classes)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, classnames: Sequence[str]) -> dict:
    """acc1, acc5 (top-min(5, C)), mean_per_class_recall, per_class_accuracy and num_images.

    `logits` (N, C) are any scores where higher means more likely; `labels` (N,) are class indices.
    Classes without images are left out of the mean recall and have per-class accuracy None.
    """
    num_classes = logits.shape[1]
    labels = labels.to(logits.device).long()
    top = logits.topk(min(5, num_classes), dim=1).indices  # (N, k)
    hits = top == labels[:, None]  # (N, k)
    correct = hits[:, 0]  # (N,)
    counts = torch.bincount(labels, minlength=num_classes)  # (C,)
    correct_counts = torch.bincount(labels[correct], minlength=num_classes)  # (C,)
    present = counts > 0
    recall = correct_counts[present].double() / counts[present]
    return {
        "acc1": correct.double().mean().item(),
        "acc5": hits.any(dim=1).double().mean().item(),
        "mean_per_class_recall": recall.mean().item(),
        "per_class_accuracy": {
            name: (correct_counts[c].item() / counts[c].item() if counts[c] > 0 else None)
            for c, name in enumerate(classnames)
        },
        "num_images": len(labels),
    }


def evaluate_zeroshot(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    preprocess_cfg: PreprocessConfig,
    data_root: str | Path,
    templates: list[str] | None = None,
    classes_file: str | Path | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    model_name: str = "",
    dataset_name: str | None = None,
    out_dir: str | Path | None = None,
    bf16: bool = False,
    num_workers: int = 0,
    positional_classes: bool = False,
) -> dict:
    """Zero-shot classification of a class-per-folder dataset; returns a CLIP_benchmark-style result.

    `templates` are templates or template files (see `load_templates`; None = defaults). `model` must
    already be on `device`. With `out_dir`, also writes confusion_matrix.png and zeroshot_examples.png.
    Class names: see `read_image_folder` (`classes_file`, `positional_classes`).
    """
    templates = load_templates(templates)
    paths, labels, classnames = read_image_folder(
        data_root, classes_file=classes_file, positional_classes=positional_classes
    )
    transform = ImageTransform(preprocess_cfg, train=False)
    data = encode_labelled_images(
        model, paths, labels, classnames, transform, batch_size, device, bf16, num_workers
    )
    classifier = build_zeroshot_classifier(
        model, tokenizer, data.classnames, templates, device=device, bf16=bf16
    )
    logits = zeroshot_logits(data.features, classifier)  # (N, C)
    metrics = classification_metrics(logits, data.labels, data.classnames)
    metrics["num_skipped"] = len(data.skipped)
    if out_dir is not None:
        out_dir = Path(out_dir)
        confusion = confusion_matrix(logits.argmax(dim=1), data.labels, len(data.classnames))
        plot_confusion_matrix(confusion, data.classnames, out_dir / "confusion_matrix.png")
        plot_zeroshot_examples(
            data.paths, logits, data.labels, data.classnames, out_dir / "zeroshot_examples.png"
        )
    name = dataset_name or Path(data_root).resolve().name
    return result_dict("zeroshot_classification", name, model_name, metrics)


def _short(name: str, width: int = 22) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


def plot_confusion_matrix(confusion: torch.Tensor, classnames: Sequence[str], path: str | Path) -> Path:
    """Row-normalised confusion matrix (true class per row) with class names on the axes up to 40 classes."""
    num_classes = len(classnames)
    rates = (confusion.double() / confusion.sum(dim=1, keepdim=True).clamp(min=1)).numpy()  # (C, C)
    side = min(4.0 + 0.28 * num_classes, 18.0)
    fig = new_figure(side + 1.2, side)
    ax = fig.add_subplot()
    im = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, shrink=0.8, label="fraction of the true class")
    if num_classes <= MAX_LABELLED_CLASSES:
        fontsize = 9 if num_classes <= 20 else 7
        names = [_short(n) for n in classnames]
        ax.set_xticks(range(num_classes), labels=names, rotation=90, fontsize=fontsize)
        ax.set_yticks(range(num_classes), labels=names, fontsize=fontsize)
        if num_classes <= 12:  # room to print each rate in its cell
            for i in range(num_classes):
                for j in range(num_classes):
                    if rates[i, j] > 0:
                        color = "white" if rates[i, j] > 0.5 else "black"
                        ax.text(j, i, f"{rates[i, j]:.2f}", ha="center", va="center", fontsize=8, color=color)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title("Zero-shot confusion matrix (row-normalised)")
    return save_figure(fig, path)


def plot_zeroshot_examples(
    paths: Sequence[Path],
    logits: torch.Tensor,
    labels: torch.Tensor,
    classnames: Sequence[str],
    path: str | Path,
    num_examples: int = NUM_EXAMPLES,
) -> Path:
    """A grid of images spread over the set, each titled with its top-3 classes and the true one
    (green when the top-1 is right, red when wrong)."""
    n = min(num_examples, len(paths))
    picks = torch.linspace(0, len(paths) - 1, n).round().long().unique().tolist()  # spread over classes
    top = logits.topk(min(3, logits.shape[1]), dim=1)
    cols = min(4, len(picks))
    rows = math.ceil(len(picks) / cols)
    fig = new_figure(3.2 * cols, 3.8 * rows)
    for panel, i in enumerate(picks):
        ax = fig.add_subplot(rows, cols, panel + 1)
        right = top.indices[i, 0].item() == labels[i].item()
        color = "tab:green" if right else "tab:red"
        show_image(ax, paths[i], border=color)
        lines = [f"true: {_short(classnames[labels[i]])}"] + [
            f"{r + 1}. {_short(classnames[c])} ({s:.2f})"
            for r, (c, s) in enumerate(zip(top.indices[i].tolist(), top.values[i].tolist()))
        ]
        ax.set_title("\n".join(lines), fontsize=8, color=color, loc="left")
    return save_figure(fig, path)

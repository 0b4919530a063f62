"""Linear probe: logistic regression on frozen, L2-normalised image features.

As in the CLIP paper, the regularisation strength is swept on a held-out part of the training set
and the chosen value refit on all of it; the validation set is only used once, for the reported score.
"""

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

from vlmkit.data.manifest import read_image_folder
from vlmkit.data.transforms import ImageTransform, PreprocessConfig
from vlmkit.errors import DataError
from vlmkit.eval.features import encode_labelled_images, result_dict
from vlmkit.eval.zeroshot import classification_metrics

log = logging.getLogger(__name__)

C_GRID = (
    0.01,
    0.1,
    1.0,
    10.0,
    100.0,
    1000.0,
    10000.0,
)  # inverse L2 strength; unit-norm features want large C
HELD_OUT_FRACTION = 0.2


def _fit(x: np.ndarray, y: np.ndarray, C: float, seed: int) -> LogisticRegression:
    return LogisticRegression(C=C, solver="lbfgs", max_iter=1000, random_state=seed).fit(x, y)


def select_C(x: np.ndarray, y: np.ndarray, seed: int = 0, grid: Sequence[float] = C_GRID) -> float:
    """The C of `grid` with the best accuracy on a held-out 20% (stratified) split of (x, y); ties go
    to the smaller C, the stronger regulariser."""
    try:
        x_fit, x_held, y_fit, y_held = train_test_split(
            x, y, test_size=HELD_OUT_FRACTION, random_state=seed, stratify=y
        )
    except ValueError:
        # too few images per class to stratify (each class needs one in each part)
        log.warning("linear probe: too few images per class for a stratified split; using a random one")
        x_fit, x_held, y_fit, y_held = train_test_split(x, y, test_size=HELD_OUT_FRACTION, random_state=seed)
    if len(np.unique(y_fit)) < 2:
        raise DataError("linear probe: too few training images to choose C; add images or pass C explicitly")
    scores = [_fit(x_fit, y_fit, C, seed).score(x_held, y_held) for C in grid]
    return float(grid[int(np.argmax(scores))])


def linear_probe_metrics(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    val_features: torch.Tensor,
    val_labels: torch.Tensor,
    classnames: Sequence[str],
    C: float | None = None,
    seed: int = 0,
) -> dict:
    """Fit logistic regression on (train_features (N, D), train_labels (N,)) and score it on the val set.

    Features are L2-normalised first. C=None picks C with `select_C`. Returns `classification_metrics`
    of the val set plus the C used and the train/val sizes.
    """
    x_train = F.normalize(train_features.double(), dim=-1).numpy()  # (N, D)
    x_val = F.normalize(val_features.double(), dim=-1).numpy()  # (M, D)
    y_train = train_labels.long().numpy()  # (N,)
    if len(np.unique(y_train)) < 2:
        raise DataError("linear probe: the training set needs images of at least two classes")
    if C is None:
        C = select_C(x_train, y_train, seed)
    clf = _fit(x_train, y_train, C, seed)
    # classes missing from train get no column from sklearn; they score -inf so they are never predicted
    logits = np.full((len(x_val), len(classnames)), -np.inf)  # (M, C)
    logits[:, clf.classes_] = clf.predict_log_proba(x_val)
    metrics = classification_metrics(torch.from_numpy(logits), val_labels, classnames)
    metrics.update(C=float(C), num_train=len(x_train), num_val=len(x_val))
    return metrics


def evaluate_linear_probe(
    model: torch.nn.Module,
    preprocess_cfg: PreprocessConfig,
    train_root: str | Path,
    val_root: str | Path,
    classes_file: str | Path | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    model_name: str = "",
    C: float | None = None,
    seed: int = 0,
    dataset_name: str | None = None,
    bf16: bool = False,
    num_workers: int = 0,
    positional_classes: bool = False,
) -> dict:
    """Linear probe of `model`'s image features on two class-per-folder sets with the same classes.

    `model` must already be on `device`. Returns a CLIP_benchmark-style result (task "linear_probe").
    """
    named = dict(classes_file=classes_file, positional_classes=positional_classes)
    train_paths, train_labels, classnames = read_image_folder(train_root, **named)
    val_paths, val_labels, val_classnames = read_image_folder(val_root, **named)
    if list(classnames) != list(val_classnames):
        # checked before encoding: a mismatch found after an hour of feature extraction helps nobody
        only_train = sorted(set(classnames) - set(val_classnames))
        only_val = sorted(set(val_classnames) - set(classnames))
        detail = (
            f"only in train: {only_train[:5]}, only in val: {only_val[:5]}"
            if only_train or only_val
            else "same names, different order"
        )
        raise DataError(
            f"{train_root} and {val_root} have different class lists ({detail}); "
            "use the same class folders or pass one classes_file"
        )
    transform = ImageTransform(preprocess_cfg, train=False)
    encode = dict(
        transform=transform, batch_size=batch_size, device=device, bf16=bf16, num_workers=num_workers
    )
    train = encode_labelled_images(model, train_paths, train_labels, classnames, **encode)
    val = encode_labelled_images(model, val_paths, val_labels, classnames, **encode)
    metrics = linear_probe_metrics(
        train.features, train.labels, val.features, val.labels, classnames, C, seed
    )
    metrics["num_skipped"] = len(train.skipped) + len(val.skipped)
    return result_dict("linear_probe", dataset_name or Path(val_root).resolve().name, model_name, metrics)

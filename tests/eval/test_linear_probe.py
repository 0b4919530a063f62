import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

from vlmkit.data.transforms import PreprocessConfig
from vlmkit.errors import DataError
from vlmkit.eval.linear_probe import C_GRID, evaluate_linear_probe, linear_probe_metrics, select_C

RAW_PIXELS = PreprocessConfig(image_size=8, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def blobs(n_per_class: int, centres: torch.Tensor, spread: float, gen: torch.Generator):
    """Gaussian blobs around `centres` (C, D); returns features (C*n, D) and labels (C*n,)."""
    num_classes, dim = centres.shape
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    return centres[labels] + spread * torch.randn(len(labels), dim, generator=gen), labels


def unit_rows(x: torch.Tensor) -> np.ndarray:
    x = x.double().numpy()
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_separable_features_reach_full_accuracy():
    gen = torch.Generator().manual_seed(0)
    centres = 5 * torch.eye(4, 16)  # four well-separated directions
    x_train, y_train = blobs(20, centres, 0.3, gen)
    x_val, y_val = blobs(10, centres, 0.3, gen)
    m = linear_probe_metrics(x_train, y_train, x_val, y_val, ["a", "b", "c", "d"])
    assert m["acc1"] == 1.0 and m["acc5"] == 1.0 and m["mean_per_class_recall"] == 1.0
    assert m["C"] in C_GRID and (m["num_train"], m["num_val"]) == (80, 40)


def test_matches_sklearn_used_directly():
    gen = torch.Generator().manual_seed(1)
    centres = torch.randn(5, 12, generator=gen)
    x_train, y_train = blobs(30, centres, 1.0, gen)  # overlapping: accuracy well below 1
    x_val, y_val = blobs(20, centres, 1.0, gen)
    names = [str(i) for i in range(5)]

    m = linear_probe_metrics(x_train, y_train, x_val, y_val, names, C=0.5, seed=0)
    clf = LogisticRegression(C=0.5, max_iter=1000).fit(unit_rows(x_train), y_train.numpy())
    predictions = clf.predict(unit_rows(x_val))
    assert m["acc1"] == pytest.approx(float((predictions == y_val.numpy()).mean()))
    assert 0.3 < m["acc1"] < 1.0
    recalls = [(predictions[y_val.numpy() == c] == c).mean() for c in range(5)]
    assert m["mean_per_class_recall"] == pytest.approx(float(np.mean(recalls)))

    # C chosen on a stratified 20% of train: redo the sweep by hand
    x, y = unit_rows(x_train), y_train.numpy()
    x_fit, x_held, y_fit, y_held = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    held_counts = np.bincount(y_held)
    assert held_counts.min() == held_counts.max() == 6  # stratified
    scores = [LogisticRegression(C=c, max_iter=1000).fit(x_fit, y_fit).score(x_held, y_held) for c in C_GRID]
    assert select_C(x, y, seed=0) == C_GRID[int(np.argmax(scores))]
    auto = linear_probe_metrics(x_train, y_train, x_val, y_val, names, C=None, seed=0)
    assert auto["C"] == C_GRID[int(np.argmax(scores))]


def test_class_without_training_images_is_never_predicted():
    gen = torch.Generator().manual_seed(2)
    centres = 4 * torch.eye(3, 8)
    x_train, y_train = blobs(10, centres[:2], 0.2, gen)  # no training images of class 2
    x_val, y_val = blobs(5, centres, 0.2, gen)
    m = linear_probe_metrics(x_train, y_train, x_val, y_val, ["a", "b", "c"], C=10.0)
    assert m["per_class_accuracy"] == {"a": 1.0, "b": 1.0, "c": 0.0}
    assert m["acc1"] == pytest.approx(10 / 15)


def write_image_folder(root, classes: dict[str, list[tuple[int, int, int]]]) -> None:
    for name, colours in classes.items():
        (root / name).mkdir(parents=True)
        for i, rgb in enumerate(colours):
            Image.new("RGB", (9, 9), rgb).save(root / name / f"{i}.png")


class MeanColour(torch.nn.Module):
    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return images.mean(dim=(2, 3))  # (B, 3)


def shades(rgb: tuple[int, int, int], n: int, seed: int) -> list[tuple[int, int, int]]:
    rng = np.random.default_rng(seed)
    return [
        tuple(int(v) for v in np.clip(np.array(rgb) + rng.integers(-30, 30, 3), 0, 255)) for _ in range(n)
    ]


def test_evaluate_linear_probe_on_colour_folders(tmp_path):
    base = {"red": (220, 30, 30), "green": (30, 220, 30), "blue": (30, 30, 220)}
    write_image_folder(tmp_path / "train", {k: shades(v, 5, i) for i, (k, v) in enumerate(base.items())})
    write_image_folder(tmp_path / "val", {k: shades(v, 3, 10 + i) for i, (k, v) in enumerate(base.items())})
    result = evaluate_linear_probe(
        MeanColour(), RAW_PIXELS, tmp_path / "train", tmp_path / "val", batch_size=4
    )
    assert result["task"] == "linear_probe"
    m = result["metrics"]
    assert m["acc1"] == 1.0 and m["num_train"] == 15 and m["num_val"] == 9 and m["num_skipped"] == 0


def test_class_lists_must_match(tmp_path):
    write_image_folder(tmp_path / "train", {"cat": [(1, 2, 3)], "dog": [(4, 5, 6)]})
    write_image_folder(tmp_path / "val", {"cat": [(1, 2, 3)], "fox": [(4, 5, 6)]})
    with pytest.raises(
        DataError, match=r"different class lists.*only in train: \['dog'\].*only in val: \['fox'\]"
    ):
        evaluate_linear_probe(MeanColour(), RAW_PIXELS, tmp_path / "train", tmp_path / "val")

import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import balanced_accuracy_score, top_k_accuracy_score

from vlmkit.data.transforms import PreprocessConfig
from vlmkit.errors import ConfigError
from vlmkit.eval.features import extract_image_features
from vlmkit.eval.templates import DEFAULT_TEMPLATES, load_templates
from vlmkit.eval.zeroshot import (
    build_zeroshot_classifier,
    classification_metrics,
    confusion_matrix,
    evaluate_zeroshot,
    plot_confusion_matrix,
    zeroshot_logits,
)

# identity normalisation: image features of a solid-colour image are exactly its RGB value
RAW_PIXELS = PreprocessConfig(image_size=8, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


class WordTokenizer:
    """Lower-case words -> ids from a growing vocabulary (0 = padding), padded to T = 12."""

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def __call__(self, texts: list[str]) -> torch.Tensor:
        tokens = torch.zeros(len(texts), 12, dtype=torch.long)  # (B, T)
        for i, text in enumerate(texts):
            ids = [self.vocab.setdefault(w, len(self.vocab) + 1) for w in re.findall(r"[a-z]+", text.lower())]
            tokens[i, : len(ids)] = torch.tensor(ids)
        return tokens


class BagOfWordsCLIP(torch.nn.Module):
    """Text feature = sum of word embeddings; image feature = mean pixel (RGB) through `image_proj`."""

    def __init__(self, vocab_size: int = 64, dim: int = 3):
        super().__init__()
        self.word = torch.nn.Embedding(vocab_size, dim, padding_idx=0)
        self.image_proj = torch.nn.Linear(3, dim, bias=False)
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(100.0)))
        self.logit_bias = None

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        x = self.word(tokens).sum(dim=1)  # (B, D)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        x = self.image_proj(images.mean(dim=(2, 3)))  # (B, D)
        return F.normalize(x, dim=-1) if normalize else x


def colour_model(tokenizer: WordTokenizer) -> BagOfWordsCLIP:
    """Colour words embed to their RGB axis, every other word to zero; images map to their mean RGB."""
    model = BagOfWordsCLIP(dim=3)
    with torch.no_grad():
        model.word.weight.zero_()
        model.image_proj.weight.copy_(torch.eye(3))
        for axis, word in enumerate(("red", "green", "blue")):
            model.word.weight[tokenizer([word])[0, 0], axis] = 1.0
    return model


def write_image_folder(root, classes: dict[str, list[tuple[int, int, int]]]) -> None:
    for name, colours in classes.items():
        (root / name).mkdir(parents=True)
        for i, rgb in enumerate(colours):
            Image.new("RGB", (10, 14), rgb).save(root / name / f"{i}.png")


# ---------------------------------------------------------------------------- templates


def test_load_templates_defaults_strings_and_file(tmp_path):
    assert load_templates(None) == list(DEFAULT_TEMPLATES)
    assert all("{}" in t for t in DEFAULT_TEMPLATES) and 6 <= len(DEFAULT_TEMPLATES) <= 10
    f = tmp_path / "prompts.txt"
    f.write_text("# satellite prompts\n\na satellite photo of {}.\n  an aerial view of {}.  \n# end\n")
    assert load_templates(["itap of a {}.", str(f)]) == [
        "itap of a {}.",
        "a satellite photo of {}.",
        "an aerial view of {}.",
    ]


def test_load_templates_errors_name_the_bad_template(tmp_path):
    with pytest.raises(ConfigError, match="a photo of a dog"):
        load_templates(["a photo of a dog"])
    f = tmp_path / "prompts.txt"
    f.write_text("a photo of {}.\n# fine\nno placeholder here\n")
    with pytest.raises(ConfigError, match=r"prompts.txt:3: .*no placeholder here"):
        load_templates([str(f)])
    empty = tmp_path / "empty.txt"
    empty.write_text("# only a comment\n")
    with pytest.raises(ConfigError, match="no templates"):
        load_templates([str(empty)])


# ---------------------------------------------------------------------------- classifier


def test_prompt_ensemble_matches_float64_reference():
    torch.manual_seed(0)
    tokenizer = WordTokenizer()
    model = BagOfWordsCLIP(vocab_size=64, dim=16)
    classnames = ["cat", "hot dog", "golden retriever", "car"]
    templates = ["a photo of a {}.", "a drawing of the {}.", "{}", "a blurry photo of a small {}."]
    classifier = build_zeroshot_classifier(model, tokenizer, classnames, templates, batch_size=5)
    assert classifier.shape == (16, 4)

    table = model.word.weight.detach().double()  # (V, D)
    expected = []
    for name in classnames:
        per_template = []
        for template in templates:
            ids = tokenizer([template.format(name)])[0]
            per_template.append(F.normalize(table[ids[ids != 0]].sum(dim=0), dim=0))  # (D,)
        expected.append(F.normalize(torch.stack(per_template).mean(dim=0), dim=0))
    expected = torch.stack(expected, dim=1)  # (D, C)
    torch.testing.assert_close(classifier.double(), expected, atol=1e-6, rtol=0)


def test_zeroshot_logits_are_cosine_similarities():
    torch.manual_seed(0)
    images = torch.randn(5, 8) * 3  # not normalised on purpose
    classifier = F.normalize(torch.randn(8, 3), dim=0)  # (D, C)
    expected = F.cosine_similarity(images.double()[:, :, None], classifier.double()[None], dim=1)  # (N, C)
    torch.testing.assert_close(zeroshot_logits(images, classifier).double(), expected, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------- metrics


def test_classification_metrics_by_hand():
    classnames = [f"c{i}" for i in range(7)]
    order = [  # classes by descending score for each image
        [0, 1, 2, 3, 4, 5, 6],  # label 0: rank 1
        [1, 2, 3, 0, 4, 5, 6],  # label 0: rank 4 -> top-5 only
        [6, 5, 4, 3, 2, 1, 0],  # label 1: rank 6 -> miss
        [1, 0, 2, 3, 4, 5, 6],  # label 1: rank 1
        [2, 0, 1, 3, 4, 5, 6],  # label 2: rank 1
    ]
    logits = torch.zeros(5, 7)
    for i, row in enumerate(order):
        logits[i, row] = torch.arange(7, 0, -1, dtype=torch.float32)
    labels = torch.tensor([0, 0, 1, 1, 2])
    m = classification_metrics(logits, labels, classnames)
    assert m["acc1"] == pytest.approx(3 / 5)
    assert m["acc5"] == pytest.approx(4 / 5)
    assert m["per_class_accuracy"] == {
        "c0": 0.5,
        "c1": 0.5,
        "c2": 1.0,
        **{f"c{i}": None for i in range(3, 7)},
    }
    assert m["mean_per_class_recall"] == pytest.approx((0.5 + 0.5 + 1.0) / 3)  # classes with images only
    assert m["num_images"] == 5


def test_classification_metrics_match_sklearn_and_acc5_caps_at_num_classes():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 9, generator=gen)
    labels = torch.randint(0, 9, (200,), generator=gen)
    m = classification_metrics(logits, labels, [str(i) for i in range(9)])
    y, s = labels.numpy(), logits.numpy()
    assert m["acc1"] == pytest.approx(top_k_accuracy_score(y, s, k=1))
    assert m["acc5"] == pytest.approx(top_k_accuracy_score(y, s, k=5))
    assert m["mean_per_class_recall"] == pytest.approx(balanced_accuracy_score(y, s.argmax(1)))

    three = classification_metrics(logits[:, :3], labels % 3, ["a", "b", "c"])
    assert three["acc5"] == 1.0  # top-min(5, 3)


def test_confusion_matrix_counts():
    c = confusion_matrix(torch.tensor([0, 1, 1, 2, 0]), torch.tensor([0, 1, 2, 2, 2]), 3)
    assert c.tolist() == [[1, 0, 0], [0, 1, 0], [1, 1, 1]]


# ---------------------------------------------------------------------------- end to end


def test_evaluate_zeroshot_on_colour_folders(tmp_path):
    root = tmp_path / "colours"
    write_image_folder(
        root,
        {
            "red": [(250, 0, 0), (200, 30, 20)],
            "green": [(0, 240, 10), (0, 0, 255)],  # second "green" image is blue: a deliberate miss
            "blue": [(10, 20, 230), (0, 0, 180)],
        },
    )
    (root / "blue" / "broken.png").write_bytes(b"not a png")
    tokenizer = WordTokenizer()
    model = colour_model(tokenizer)
    model.train()
    out_dir = tmp_path / "eval"
    result = evaluate_zeroshot(
        model, tokenizer, RAW_PIXELS, root, batch_size=4, model_name="colour", out_dir=out_dir
    )
    assert model.training  # mode restored for a trainer that evaluates mid-run
    assert result["task"] == "zeroshot_classification"
    assert result["dataset"] == "colours" and result["model"] == "colour"
    m = result["metrics"]
    assert m["num_images"] == 6 and m["num_skipped"] == 1
    assert m["acc1"] == pytest.approx(5 / 6)
    assert m["acc5"] == 1.0  # 3 classes: top-3
    assert m["per_class_accuracy"] == {"red": 1.0, "green": 0.5, "blue": 1.0}
    assert m["mean_per_class_recall"] == pytest.approx(2.5 / 3)
    for name in ("confusion_matrix.png", "zeroshot_examples.png"):
        with Image.open(out_dir / name) as png:
            assert png.format == "PNG" and min(png.size) > 100


def test_confusion_plot_with_many_classes(tmp_path):
    gen = torch.Generator().manual_seed(0)
    names = [f"class number {i}" for i in range(40)]
    counts = torch.randint(0, 5, (40, 40), generator=gen)
    path = plot_confusion_matrix(counts, names, tmp_path / "cm.png")
    with Image.open(path) as png:
        assert png.size[0] > 500


def test_bf16_features_close_to_float32(tmp_path):
    write_image_folder(tmp_path, {"x": [(250, 10, 10), (10, 200, 30), (5, 5, 90)]})
    paths = sorted(tmp_path.glob("x/*.png"))
    torch.manual_seed(0)
    model = BagOfWordsCLIP(dim=8)

    def transform(image):
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)

    fp32 = extract_image_features(model, paths, transform)
    bf16 = extract_image_features(model, paths, transform, bf16=True)
    assert fp32.kept == [0, 1, 2] and fp32.features.dtype == torch.float32
    torch.testing.assert_close(fp32.features.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(bf16.features, fp32.features, atol=2e-2, rtol=0)

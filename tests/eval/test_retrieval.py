import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vlmkit.data.transforms import PreprocessConfig
from vlmkit.eval import retrieval
from vlmkit.eval.retrieval import evaluate_retrieval, retrieval_metrics

RAW_PIXELS = PreprocessConfig(image_size=8, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
COLOURS = ("red", "green", "blue")


def brute_force_recalls(image_features, text_features, text_to_image, ks) -> dict:
    """Float64 loops: a caption's rank is 1 + the number of images scored strictly above its own."""
    img = F.normalize(image_features.double(), dim=-1).tolist()
    txt = F.normalize(text_features.double(), dim=-1).tolist()
    owner = text_to_image.tolist()
    sim = [[sum(a * b for a, b in zip(t, i)) for i in img] for t in txt]  # (Nt, Ni)
    t2i_rank = [1 + sum(s > row[owner[t]] for s in row) for t, row in enumerate(sim)]
    i2t_rank = {}  # best rank among an image's captions, for images that have captions
    for i in range(len(img)):
        column = [sim[t][i] for t in range(len(txt))]
        ranks = [1 + sum(s > column[t] for s in column) for t in range(len(txt)) if owner[t] == i]
        if ranks:
            i2t_rank[i] = min(ranks)
    out = {}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = sum(r <= k for r in t2i_rank) / len(t2i_rank)
        out[f"text_retrieval_recall@{k}"] = sum(r <= k for r in i2t_rank.values()) / len(i2t_rank)
    return out


def test_recall_by_hand_with_several_captions_per_image():
    e = torch.eye(4)
    images = e  # i0..i3 on the axes; i3 has no caption and is only a distractor
    texts = torch.stack(
        [
            e[0],  # c0 -> i0: own image first
            0.1 * e[0] + 0.9 * e[1],  # c1 -> i0: i1 first, own image second
            e[1] + 0.5 * e[2],  # c2 -> i1: own image first
            e[0] + 0.6 * e[2],  # c3 -> i2: i0 first, own image second
        ]
    )
    text_to_image = torch.tensor([0, 0, 1, 2])
    m = retrieval_metrics(images, texts, text_to_image, ks=(1, 2))
    # text->image: c0 and c2 hit at 1, all four by 2
    assert m["image_retrieval_recall@1"] == pytest.approx(2 / 4)
    assert m["image_retrieval_recall@2"] == pytest.approx(1.0)
    # image->text: i0's best caption is c0 (hit); i1's is c1, which belongs to i0 (miss, c2 second);
    # i2's is c3 (0.51 > c2's 0.45: hit). i3 has no caption and is not a query.
    assert m["text_retrieval_recall@1"] == pytest.approx(2 / 3)
    assert m["text_retrieval_recall@2"] == pytest.approx(1.0)


def test_recall_matches_brute_force(monkeypatch):
    monkeypatch.setattr(retrieval, "CHUNK_SIZE", 4)  # several similarity blocks
    gen = torch.Generator().manual_seed(0)
    num_images, num_texts = 9, 23
    images = torch.randn(num_images, 6, generator=gen)
    texts = torch.randn(num_texts, 6, generator=gen) * 2
    # every image gets one caption, the rest go to random images
    text_to_image = torch.cat(
        [torch.randperm(num_images, generator=gen), torch.randint(0, num_images, (14,), generator=gen)]
    )
    ks = (1, 3, 5, 10)
    m = retrieval_metrics(images, texts, text_to_image, ks=ks)
    expected = brute_force_recalls(images, texts, text_to_image, ks)
    assert m == pytest.approx(expected, abs=1e-12)
    assert m["image_retrieval_recall@10"] == 1.0  # k beyond the gallery is the whole gallery


def test_recall_rejects_bad_index():
    with pytest.raises(ValueError, match="text_to_image"):
        retrieval_metrics(torch.eye(2), torch.eye(2), torch.tensor([0, 2]))


class ColourCLIP(torch.nn.Module):
    """Image feature = mean RGB; caption feature = the RGB axis of each colour word it contains."""

    def __init__(self):
        super().__init__()
        self.logit_scale = torch.nn.Parameter(torch.tensor(4.6))
        self.logit_bias = None

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return images.mean(dim=(2, 3))  # (B, 3)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return tokens.float()  # (B, 3): the fake tokenizer already counts colour words


def colour_tokenizer(texts: list[str]) -> torch.Tensor:
    return torch.tensor([[t.count(c) for c in COLOURS] for t in texts], dtype=torch.long)  # (B, 3)


def test_evaluate_retrieval_groups_captions_by_image(tmp_path):
    pixels = {"r.png": (240, 5, 5), "g.png": (5, 240, 5), "b.png": (5, 5, 240), "p.png": (200, 0, 200)}
    for name, rgb in pixels.items():
        Image.new("RGB", (12, 9), rgb).save(tmp_path / name)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    rows = [
        ("r.png", "a red square"),
        ("g.png", "a green square"),
        ("r.png", "something red"),
        ("b.png", "a blue square"),
        ("p.png", "a red and blue square"),  # purple: equally close to both captions' colours
        ("b.png", "green green green blue"),  # a poor caption: nearer g.png than its own image
        ("bad.png", "never decoded"),
    ]
    manifest = tmp_path / "captions.jsonl"
    manifest.write_text("".join(json.dumps({"image": image, "caption": text}) + "\n" for image, text in rows))

    out_dir = tmp_path / "eval"
    result = evaluate_retrieval(
        ColourCLIP(), colour_tokenizer, RAW_PIXELS, manifest, batch_size=2, out_dir=out_dir
    )
    assert result["task"] == "zeroshot_retrieval" and result["dataset"] == "captions"
    m = result["metrics"]
    assert (m["num_images"], m["num_captions"], m["num_skipped"]) == (4, 6, 1)
    # text->image @1: the red/green/blue captions hit; "a red and blue square" finds p.png (purple)
    # first; the poor caption finds g.png, not b.png -> 5/6
    assert m["image_retrieval_recall@1"] == pytest.approx(5 / 6)
    # image->text @1: every image's best caption is one of its own (g.png: "a green square" at 1.0
    # beats the poor caption at 0.95) -> 4/4
    assert m["text_retrieval_recall@1"] == pytest.approx(1.0)
    with Image.open(out_dir / "retrieval_examples.png") as png:
        assert png.format == "PNG"

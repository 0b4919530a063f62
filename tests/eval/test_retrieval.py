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


# ---------------------------------------------------------------- ITM reranking (fusion models)


def tiny_fusion():
    from vlmkit.models.registry import create_model

    spec = {"vision.image_size": 16, "vision.patch_size": 8, "vision.layers": 1, "vision.width": 32,
            "vision.heads": 2, "text.layers": 2, "text.fusion_start": 1, "text.width": 32, "text.heads": 2,
            "text.vocab_size": 50, "text.context_length": 12, "embed_dim": 16}  # fmt: skip
    torch.manual_seed(0)
    model = create_model("fusion-tiny", **spec).eval()
    with torch.no_grad():  # large random weights: ITM logits that differ between pairs by more than cosines
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


def brute_force_reranked(model, images, tokens, text_to_image, k):
    """Float64 loops over pairs: each query's k best by cosine, re-scored by ITM match logit + cosine.
    Returns (text R@1, image R@1, each text's best image)."""
    with torch.no_grad():
        it = model.encode_image_tokens(images)
        img = model.image_embedding(it).double()
        txt = model.encode_text(tokens).double()
        sim = (img @ txt.T).tolist()  # (Ni, Nt)

        def score(i, t):
            return model.itm_logits(tokens[t : t + 1], it[i : i + 1])[0, 1].item() + sim[i][t]

        owner = text_to_image.tolist()
        text_hits = []
        for i in range(len(sim)):
            head = sorted(range(len(owner)), key=lambda t: -sim[i][t])[:k]
            text_hits.append(owner[max(head, key=lambda t: score(i, t))] == i)
        best_image = []
        for t in range(len(owner)):
            head = sorted(range(len(sim)), key=lambda i: -sim[i][t])[:k]
            best_image.append(max(head, key=lambda i: score(i, t)))
    image_hits = [b == o for b, o in zip(best_image, owner, strict=True)]
    return sum(text_hits) / len(text_hits), sum(image_hits) / len(image_hits), best_image


def test_itm_reranking_equals_a_pairwise_recomputation():
    model = tiny_fusion()
    g = torch.Generator().manual_seed(3)
    images = torch.randn(7, 3, 16, 16, generator=g)
    tokens = torch.randint(4, 50, (7, 9), generator=g)
    tokens[:, 0], tokens[3, 6:] = 1, 0  # a first token, and padding in one caption
    text_to_image = torch.arange(7)
    got = retrieval.itm_rerank_metrics(model, images, tokens, text_to_image, k=4)
    want_text, want_image, best = brute_force_reranked(model, images, tokens, text_to_image, k=4)
    assert got["itm_text_retrieval_recall@1"] == pytest.approx(want_text)
    assert got["itm_image_retrieval_recall@1"] == pytest.approx(want_image)


class ShiftedFusion(torch.nn.Module):
    """A hand-made fusion model over N one-hot images and N one-token captions: ITC ranks caption j's own
    image second, after image j + 1; the ITM head knows better (match logit 5 for the pair (j, j))."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def encode_image_tokens(self, images):  # (B, N, 1, 1) one-hot -> (B, 1, N)
        return images.flatten(1)[:, None, :]

    def image_embedding(self, tokens):
        return F.normalize(tokens[:, 0], dim=-1)

    def encode_text(self, tokens):  # caption j: near image j + 1, a little nearer than to image j
        j = tokens[:, 0]
        e = 0.8 * F.one_hot((j + 1) % self.n, self.n).float() + 0.6 * F.one_hot(j, self.n).float()
        return F.normalize(e, dim=-1)

    def itm_logits(self, tokens, image_tokens):
        match = (image_tokens[:, 0].argmax(-1) == tokens[:, 0]).float() * 5.0
        return torch.stack([-match, match], dim=1)


def test_itm_reranking_corrects_itc_where_the_itm_head_knows_better():
    n = 5
    images = torch.eye(n).view(n, n, 1, 1)
    tokens = torch.arange(n)[:, None]
    for k, want in ((1, 0.0), (2, 1.0)):  # k = 1 keeps ITC's (wrong) first; k = 2 lets ITM pick
        r = retrieval.itm_rerank_metrics(ShiftedFusion(n), images, tokens, torch.arange(n), k=k)
        assert r["image_retrieval_recall@1"] == r["text_retrieval_recall@1"] == 0.0
        assert r["itm_image_retrieval_recall@1"] == want and r["itm_text_retrieval_recall@1"] == want
        assert r["itm_image_retrieval_recall@5"] == 1.0 and r["itm_rerank_k"] == k


def test_evaluate_retrieval_reranks_a_manifest_and_refuses_models_without_itm(tmp_path):
    from vlmkit.data.transforms import ImageTransform, load_image
    from vlmkit.errors import ConfigError

    model = tiny_fusion()
    rng = torch.Generator().manual_seed(5)
    names = []
    for i in range(5):
        pixels = (torch.rand(16, 16, 3, generator=rng) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(tmp_path / f"{i}.png")
        names.append(f"{i}.png")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(
        "".join(json.dumps({"image": n, "caption": f"c{i}"}) + "\n" for i, n in enumerate(names))
    )

    def tokenizer(texts):  # ids 1, then two ids from the caption's number: every caption distinct
        return torch.tensor([[1, 10 + int(t[1:]), 30 + int(t[1:])] for t in texts])

    pre = PreprocessConfig(image_size=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    r = evaluate_retrieval(model, tokenizer, pre, manifest, rerank=3)["metrics"]
    transform = ImageTransform(pre, train=False)
    images = torch.stack([transform(load_image(tmp_path / n)) for n in names])
    want = brute_force_reranked(model, images, tokenizer([f"c{i}" for i in range(5)]), torch.arange(5), 3)
    assert (r["itm_text_retrieval_recall@1"], r["itm_image_retrieval_recall@1"]) == pytest.approx(want[:2])
    assert r["itm_rerank_k"] == 3 and "text_retrieval_recall@1" in r
    with pytest.raises(ConfigError, match="needs a model with an ITM head.*ColourCLIP"):
        evaluate_retrieval(ColourCLIP(), colour_tokenizer, RAW_PIXELS, manifest, rerank=3)
    with pytest.raises(ConfigError, match="--rerank must be"):
        evaluate_retrieval(model, tokenizer, pre, manifest, rerank=-1)

"""The CLIP/SigLIP dual encoder, its towers' pooling and masking, and the model registry."""

import json
import math

import pytest
import torch

from vlmkit.config import from_dict, to_dict
from vlmkit.errors import ConfigError
from vlmkit.models import SIZES, create_model, get_model_config, list_models
from vlmkit.nn.packing import Packing

# A fast stand-in for the tiny models wherever the test is about behaviour, not the real sizes.
SMALL = {
    "embed_dim": 32, "vision.width": 32, "vision.layers": 2, "vision.heads": 2, "vision.image_size": 32,
    "vision.patch_size": 8, "text.width": 32, "text.layers": 2, "text.heads": 2, "text.vocab_size": 50,
    "text.context_length": 16,
}  # fmt: skip
EOT = 2


def small_model(name: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(name, **{**SMALL, **overrides}).eval()


def random_tokens(batch: int, length: int, seed: int = 0, vocab: int = 50) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g)  # ids 0-2 are pad / start / end


@pytest.mark.parametrize("name", ["clip-tiny", "siglip-tiny"])
def test_output_shapes_and_normalised_features(name):
    torch.manual_seed(0)
    model = create_model(name).eval()
    cfg = model.cfg
    images = torch.randn(2, 3, cfg.vision.image_size, cfg.vision.image_size)  # (B, 3, H, W)
    text = random_tokens(3, cfg.text.context_length)  # (B, T), a different batch size on purpose
    with torch.no_grad():
        out = model(images, text)
        logits_per_image, logits_per_text = model.logits(images, text)
    assert out.image_features.shape == (2, cfg.embed_dim)
    assert out.text_features.shape == (3, cfg.embed_dim)
    torch.testing.assert_close(out.image_features.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(out.text_features.norm(dim=-1), torch.ones(3))
    assert logits_per_image.shape == (2, 3) and logits_per_text.shape == (3, 2)
    assert out.logit_scale.ndim == 0
    if name.startswith("clip"):
        assert out.logit_bias is None
        assert out.logit_scale.item() == pytest.approx(1 / 0.07, rel=1e-6)
    else:
        assert out.logit_bias.item() == -10.0
        assert out.logit_scale.item() == pytest.approx(10.0, rel=1e-6)


def test_logit_scale_is_clamped_at_max():
    model = small_model("clip-tiny")
    images, text = torch.randn(1, 3, 32, 32), random_tokens(1, 8)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1000.0))
        assert model(images, text).logit_scale.item() == pytest.approx(100.0, rel=1e-6)
        model.logit_scale.fill_(math.log(50.0))
        assert model(images, text).logit_scale.item() == pytest.approx(50.0, rel=1e-6)


def test_causal_text_pools_first_end_of_text():
    model = small_model("clip-tiny")
    text = random_tokens(1, 12)
    text[0, 4] = EOT  # the first end-of-text token: the one pooled
    text[0, 8] = EOT
    with torch.no_grad():
        base = model.encode_text(text)
        after = text.clone()
        after[0, 6] = 7  # after the first EOT (and before the second): the causal tower cannot see it
        before = text.clone()
        before[0, 2] = 7
        tokens = model.text.forward_tokens(text)  # (1, T, C)
        torch.testing.assert_close(model.encode_text(after), base, rtol=0, atol=0)
        assert not torch.allclose(model.encode_text(before), base, atol=1e-4)
        torch.testing.assert_close(base, model.text.proj(tokens[:, 4]))
        # A row with no end-of-text token falls back to the last position.
        no_eot = random_tokens(1, 12, seed=1)
        torch.testing.assert_close(
            model.encode_text(no_eot), model.text.proj(model.text.forward_tokens(no_eot)[:, -1])
        )


def test_siglip_text_pools_last_token():
    model = small_model("siglip-tiny")
    text = random_tokens(2, 10)
    text[:, 3] = EOT  # an end-of-text token must not matter to the "last" pool
    with torch.no_grad():
        tokens = model.text.forward_tokens(text)  # (B, T, C)
        pooled = model.encode_text(text)
        torch.testing.assert_close(pooled, model.text.proj(tokens[:, -1]))
        assert not torch.allclose(pooled, model.text.proj(tokens[:, 3]), atol=1e-4)
        # Bidirectional: a change anywhere, even before the end-of-text token, reaches the last token.
        changed = text.clone()
        changed[:, 1] = 7
        assert not torch.allclose(model.encode_text(changed), pooled, atol=1e-4)


@pytest.mark.parametrize("name", ["clip-tiny", "siglip-tiny"])
def test_pooled_fast_path_equals_full_towers_in_float64(name):
    """encode_* run the last block for the pooled token only: same features and gradients as all tokens."""
    model = small_model(name).double()
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    text = random_tokens(3, 12)
    text[0, 5] = EOT
    text[1, 11] = EOT

    def full(model):
        tokens = model.visual.forward_tokens(images)
        if model.visual.cfg.pool == "cls":
            img = tokens[:, 0]
        else:
            img = model.visual.attn_pool(tokens)[:, 0]
        img = model.visual.proj(img) if model.visual.proj is not None else img
        txt = model.text.proj(model.text.pool(model.text.forward_tokens(text), text))
        return img, txt

    outs, grads = [], []
    for forward in (lambda m: (m.visual(images), m.text(text)), full):
        model.zero_grad()
        img, txt = forward(model)
        (img.pow(2).sum() + (txt * torch.linspace(-1, 1, txt.shape[-1], dtype=txt.dtype)).sum()).backward()
        outs.append((img.detach(), txt.detach()))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    for a, b in zip(outs[0], outs[1], strict=True):
        torch.testing.assert_close(a, b)
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], msg=n)


@pytest.mark.parametrize("pool", ["eot", "argmax"])
def test_causal_text_drops_padding_after_the_last_pooled_token(pool):
    """Short captions padded to the context length: the same features and gradients as all tokens."""
    model = small_model("clip-tiny", **{"text.pool": pool}).double()
    text = torch.zeros(3, 16, dtype=torch.long)  # pad id 0 after each caption
    for row, n in enumerate([4, 7, 5]):
        text[row, : n - 1] = random_tokens(1, n - 1, seed=row)[0]
        text[row, n - 1] = EOT if pool == "eot" else 49  # argmax pooling reads the largest id
    outs, grads = [], []
    for fast in (True, False):
        model.zero_grad()
        if fast:
            feats = model.text(text)
        else:  # every token through every block, then the pooled one
            feats = model.text.proj(model.text.pool(model.text.forward_tokens(text), text))
        (feats * torch.linspace(-1, 1, feats.shape[-1], dtype=feats.dtype)).sum().backward()
        outs.append(feats.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(outs[0], outs[1])
    for n in grads[1]:
        torch.testing.assert_close(grads[0][n], grads[1][n], msg=n)
    # the positions after the longest caption carry no gradient: they were never computed
    assert (grads[0]["text.positional_embedding"][7:] == 0).all()


def test_causal_text_packs_captions_of_different_lengths(monkeypatch):
    """Tokens after each row's end-of-text (not padding here) change nothing: packed rows give the features
    and gradients of the full tower, and the tokens after each end-of-text get no gradient."""
    model = small_model("clip-tiny").double()
    text = random_tokens(4, 16)
    ends = [2, 15, 6, 9]
    for row, end in enumerate(ends):
        text[row, end] = EOT
    packings = []
    real_maybe = Packing.maybe

    def maybe(*args, **kwargs):
        packings.append(real_maybe(*args, **kwargs))
        return packings[-1]

    monkeypatch.setattr(Packing, "maybe", maybe)
    outs, grads = [], []
    for fast in (True, False):
        model.zero_grad()
        if fast:
            feats = model.text(text)
        else:
            feats = model.text.proj(model.text.pool(model.text.forward_tokens(text), text))
        (feats * torch.linspace(-1, 1, feats.shape[-1], dtype=feats.dtype)).sum().backward()
        outs.append(feats.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert len(packings) == 1 and packings[0] is not None  # the fast path packed the rows
    torch.testing.assert_close(outs[0], outs[1])
    for n in grads[1]:
        torch.testing.assert_close(grads[0][n], grads[1][n], msg=n)
    # the embedding rows of tokens seen only after an end-of-text carry no gradient on the packed path
    after = {int(t) for row, end in enumerate(ends) for t in text[row, end + 1 :]}
    before = {int(t) for row, end in enumerate(ends) for t in text[row, : end + 1]}
    unseen = sorted(after - before)
    assert unseen and (grads[0]["text.token_embedding.weight"][unseen] == 0).all()


@pytest.mark.parametrize("name", ["clip-tiny", "siglip-tiny"])
def test_position_embeddings_resampled_for_other_image_sizes(name):
    model = small_model(name)
    visual = model.visual
    prefix = visual.num_prefix_tokens
    assert visual.pos_embed_for((4, 4)) is visual.positional_embedding  # native 32 / 8: identity
    with torch.no_grad():
        # A constant grid table must stay constant when resized; prefix rows are kept as they are.
        visual.positional_embedding[prefix:] = torch.linspace(-1, 1, visual.cfg.width)
        table = visual.pos_embed_for((6, 5))
        assert table.shape == (prefix + 30, visual.cfg.width)
        torch.testing.assert_close(table[:prefix], visual.positional_embedding[:prefix])
        torch.testing.assert_close(table[prefix:], visual.positional_embedding[prefix:][:1].expand(30, -1))
        features = model.encode_image(torch.randn(2, 3, 48, 40))  # a 6 x 5 patch grid
    assert features.shape == (2, model.cfg.embed_dim)


@pytest.mark.parametrize("causal", [True, False])
def test_padding_mask_matches_unpadded_sequence(causal):
    model = small_model("siglip-tiny", **{"text.causal": causal, "text.pool": "eot"})
    lengths = [5, 9]
    text = torch.zeros(2, 14, dtype=torch.long)  # pad id 0
    for row, n in enumerate(lengths):
        text[row, :n] = random_tokens(1, n, seed=row)[0]
        text[row, n - 1] = EOT
    mask = text != 0  # (B, T) True = a real token
    with torch.no_grad():
        padded = model.encode_text(text, attention_mask=mask)
        for row, n in enumerate(lengths):
            unpadded = model.encode_text(text[row : row + 1, :n])
            torch.testing.assert_close(padded[row : row + 1], unpadded, rtol=1e-5, atol=1e-5)
        # Without the mask a bidirectional tower attends to the padding and the result moves.
        if not causal:
            assert not torch.allclose(model.encode_text(text), padded, atol=1e-4)


def test_get_model_config_overrides():
    base = get_model_config("clip-tiny")
    cfg = get_model_config(
        "clip-tiny", **{"vision.layers": "2", "embed_dim": 128}, text={"width": 64, "heads": 2}
    )
    assert (cfg.vision.layers, cfg.embed_dim, cfg.text.width, cfg.text.heads) == (2, 128, 64, 2)
    assert cfg.vision.width == base.vision.width and cfg.text.layers == base.text.layers  # untouched
    assert base.vision.layers == SIZES["tiny"]["v"][1]  # the base table is not mutated
    model = create_model("clip-tiny", **{"vision.layers": 1, "text.layers": 1, "text.vocab_size": 100})
    assert len(model.visual.transformer.blocks) == 1 and model.text.token_embedding.num_embeddings == 100


@pytest.mark.parametrize(
    "name, overrides, message",
    [
        ("clip-huge", {}, "unknown model 'clip-huge'"),
        ("blip-tiny", {}, "unknown model 'blip-tiny'"),
        ("clip-tiny", {"vision.depth": 3}, "unknown key 'depth'"),
        ("clip-tiny", {"nope": 1}, "unknown key 'nope'"),
        ("clip-tiny", {"text": {"widht": 64}}, "unknown key 'widht'"),
        ("clip-tiny", {"vision.layers": "many"}, "vision.layers"),
    ],
)
def test_bad_names_and_overrides_raise_config_error(name, overrides, message):
    with pytest.raises(ConfigError, match=message):
        get_model_config(name, **overrides)


@pytest.mark.parametrize("name", list_models())
def test_config_round_trips_through_json(name):
    cfg = get_model_config(name)
    restored = from_dict(type(cfg), json.loads(json.dumps(to_dict(cfg))))
    assert restored == cfg
    if hasattr(restored, "vision"):
        assert restored.vision.image_size % restored.vision.patch_size == 0


def test_every_named_model_builds():
    counts = {}
    for name in [n for n in list_models() if n.split("-")[0] in ("clip", "siglip")]:
        # Only the tiny models allocate real weights; the rest are built on the meta device (shapes only).
        device = "cpu" if name.endswith("-tiny") else "meta"
        with torch.device(device):
            model = create_model(name)
        counts[name] = sum(p.numel() for p in model.parameters())
        assert model.cfg.loss == name.partition("-")[0]
    # OpenAI's published CLIP ViT-B/32 has 151,277,313 parameters; the B/16 and L/14 tables follow
    # the same architecture, so their counts pin down every width, depth and context length.
    assert counts["clip-B-32"] == 151_277_313
    assert counts["clip-B-16"] == 149_620_737
    assert counts["clip-L-14"] == 427_616_513

"""FLIP's patch dropout: what is kept, reproducibility, eval mode, pooling and the pooled fast path."""

import pytest
import torch

from vlmkit.errors import ConfigError
from vlmkit.models import create_model
from vlmkit.nn.patch import PatchDropout

SMALL = {
    "embed_dim": 32, "vision.width": 32, "vision.layers": 2, "vision.heads": 2, "vision.image_size": 32,
    "vision.patch_size": 8, "text.width": 32, "text.layers": 1, "text.heads": 2, "text.vocab_size": 50,
    "text.context_length": 16,
}  # fmt: skip


def tokens(B=4, N=16, C=8, prefix=1):
    """Token t of row b holds b * 1000 + t in every channel: each kept token says where it came from."""
    x = torch.arange(prefix + N, dtype=torch.float64)[None, :, None] + 1000 * torch.arange(B)[:, None, None]
    return x.expand(B, prefix + N, C).clone()


@pytest.mark.parametrize("prob, kept", [(0.5, 8), (0.75, 4), (0.9, 1), (0.99, 1), (0.0, 16)])
def test_keeps_the_class_token_and_a_fixed_count_of_distinct_patches_per_row(prob, kept):
    drop = PatchDropout(prob, num_prefix_tokens=1).train()
    x = tokens()
    y = drop(x)
    assert y.shape == (4, 1 + kept, 8)
    for b in range(4):
        assert y[b, 0, 0] == b * 1000  # the class token, first
        ids = (y[b, 1:, 0] - b * 1000).long().tolist()  # patches of this row only, in raster order
        assert ids == sorted(set(ids)) and all(1 <= i <= 16 for i in ids)


def test_rows_keep_different_patches_and_a_generator_makes_it_reproducible():
    drop = PatchDropout(0.5).train()
    x = tokens(B=8)
    drop.generator = torch.Generator().manual_seed(3)
    a = drop(x)
    drop.generator = torch.Generator().manual_seed(3)
    b = drop(x)
    torch.testing.assert_close(a, b)
    picked = {tuple((a[i, 1:, 0] - 1000 * i).long().tolist()) for i in range(8)}
    assert len(picked) > 1  # not one mask for the whole batch
    drop.generator = torch.Generator().manual_seed(4)
    assert not torch.equal(drop(x), a)
    # without a generator: the global one, which torch.manual_seed seeds
    drop.generator = None
    torch.manual_seed(0)
    c = drop(x)
    torch.manual_seed(0)
    torch.testing.assert_close(drop(x), c)


def test_nothing_is_dropped_in_eval_mode_and_bad_rates_are_refused():
    x = tokens()
    assert PatchDropout(0.75).eval()(x) is x
    with pytest.raises(ValueError, match="0, 1"):
        PatchDropout(1.0)
    with pytest.raises(ConfigError, match="patch_dropout"):
        create_model("flip-tiny", **{"vision.patch_dropout": 1.5})
    with pytest.raises(ConfigError, match="LLaVA"):
        create_model("llava-tiny", **{"vision.patch_dropout": 0.5})


def reference_embedding(visual, images, index):
    """The tower in float64 written out with plain tensor ops on the kept tokens `index` (B, K): blocks on
    all kept tokens, then the pooling the config names (no fast path, no PatchDropout module)."""
    B = images.shape[0]
    x = visual.patch_embed(images)
    if visual.class_embedding is not None:
        x = torch.cat([visual.class_embedding.expand(B, 1, -1), x], dim=1)
    x = x + visual.positional_embedding
    p = visual.num_prefix_tokens
    kept = x[:, p:].gather(1, index[:, :, None].expand(-1, -1, x.shape[-1]))
    x = visual.ln_pre(torch.cat([x[:, :p], kept], dim=1))
    for block in visual.transformer.blocks:
        x = block(x)
    x = visual.ln_post(x)
    pooled = x[:, 0] if visual.cfg.pool == "cls" else x[:, p:].mean(dim=1)
    return visual.proj(pooled)


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_pooled_fast_path_and_mean_pooling_cover_exactly_the_visible_tokens(pool):
    torch.manual_seed(0)
    model = create_model("flip-tiny", **{**SMALL, "vision.pool": pool}).double().train()
    visual = model.visual
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    visual.patch_dropout.generator = torch.Generator().manual_seed(1)
    got = model.encode_image(images)  # the pooled fast path for "cls"
    # the same noise, replayed: which patches were kept
    noise = torch.rand(3, 16, generator=torch.Generator().manual_seed(1))
    index = noise.argsort(dim=1)[:, :8].sort(dim=1).values
    want = reference_embedding(visual, images, index)
    torch.testing.assert_close(got, want)
    # and gradients flow to the patch embedding through the kept tokens only
    got.sum().backward()
    assert visual.patch_embed.proj.weight.grad.abs().sum() > 0
    # evaluation sees every patch: the same as a model without patch dropout
    full = create_model("clip-tiny", **{**SMALL, "vision.pool": pool}).double().eval()
    full.load_state_dict(model.state_dict())
    model.eval()
    torch.testing.assert_close(model.encode_image(images), full.encode_image(images))


def test_masking_makes_the_vision_tower_cheaper():
    from torch.utils.flop_counter import FlopCounterMode

    # 64 patches; wide enough that the blocks, not the patch projection, cost most (as in real sizes)
    model = create_model("flip-tiny", **{**SMALL, "vision.image_size": 64, "vision.width": 128})
    images = torch.randn(4, 3, 64, 64)

    def flops(rate):
        model.visual.patch_dropout.prob = rate
        with FlopCounterMode(display=False) as counter:
            model.train().encode_image(images)
        return counter.get_total_flops()

    full, half, quarter = flops(0.0), flops(0.5), flops(0.75)
    # the blocks see 33 and 17 of 65 tokens; the patch embedding still projects every patch
    assert 0.45 < half / full < 0.6 and 0.25 < quarter / full < 0.35

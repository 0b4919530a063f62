"""Flamingo: at zero gates it is its language model exactly; which image each token sees; cached, batched and
left-padded generation against one-by-one recomputation; the frozen-LM parts that train; bad input."""

from __future__ import annotations

import pytest
import torch

from vlmkit.errors import ConfigError, DataError
from vlmkit.models.decoder import DecoderConfig
from vlmkit.models.flamingo import Flamingo, FlamingoConfig, PerceiverConfig, media_counts, media_mask
from vlmkit.models.generation import GenerationConfig
from vlmkit.models.registry import create_model
from vlmkit.models.vit import VisionConfig

IMG, EOC = 3, 4


def tiny(**kw) -> FlamingoConfig:
    return FlamingoConfig(
        vision=VisionConfig(image_size=16, patch_size=8, width=32, layers=2, heads=2, proj=False),
        decoder=DecoderConfig(vocab_size=50, width=64, layers=3, heads=4, kv_heads=2, max_seq_len=64),
        perceiver=PerceiverConfig(latents=4, depth=1, heads=2, head_dim=16, max_frames=2),
        **kw,
    )


def opened(model: Flamingo, value: float = 0.5) -> Flamingo:
    """Non-zero gates: at zero the images have no effect and no test about them proves anything."""
    with torch.no_grad():
        for block in model.gated_cross_attn_layers:
            block.alpha_cross_attn.fill_(value)
            block.alpha_dense.fill_(value)
    return model.eval()


def ids(*rows: list[int]) -> torch.Tensor:
    return torch.tensor(rows)


def test_zero_gates_equal_the_language_model_exactly():
    torch.manual_seed(0)
    model = Flamingo(tiny()).eval()
    x = ids([5, IMG, 7, 8, EOC, IMG, 9, 10], [IMG, 11, 12, EOC, 13, IMG, 14, 15])
    images = torch.randn(2, 2, 3, 16, 16)
    out = model(x, images).logits
    plain = model.language_model(x).logits
    assert torch.equal(out, plain)
    # the trainable copies of the new tokens' rows start as the LM's own
    assert torch.equal(model.new_token_embeds[0], model.language_model.embed_tokens.weight[IMG])


def test_which_image_each_token_sees():
    x = ids([5, 6, IMG, 7, 8, IMG, 9])
    count = media_counts(x, IMG)
    assert count.tolist() == [[0, 0, 1, 1, 1, 2, 2]]
    prev = media_mask(count, 2, "previous")[0]  # (T, M)
    assert prev.tolist() == [[0, 0], [0, 0], [1, 0], [1, 0], [1, 0], [0, 1], [0, 1]]
    every = media_mask(count, 2, "all")[0]
    assert every.tolist() == [[0, 0], [0, 0], [1, 0], [1, 0], [1, 0], [1, 1], [1, 1]]
    # a cache that has read one image already continues from it
    assert media_counts(ids([7, IMG]), IMG, torch.tensor([1])).tolist() == [[1, 2]]


@pytest.mark.parametrize("mode", ["previous", "all"])
def test_images_reach_exactly_the_tokens_that_may_see_them(mode):
    """Text before the first image is untouched by any image; in "previous" mode the cross-attention of a
    token after the second image reads that image only (checked with one gated block and one LM layer, so
    self-attention cannot carry the first image forward)."""
    torch.manual_seed(0)
    cfg = tiny(media_attention=mode)
    cfg.decoder.layers = 1
    model = opened(Flamingo(cfg))
    x = ids([5, 6, IMG, 7, 8, IMG, 9, 10])
    a = torch.randn(1, 2, 3, 16, 16)
    b = a.clone()
    b[:, 0] = torch.randn(3, 16, 16)  # change the first image only
    la, lb = model(x, a).logits, model(x, b).logits
    assert torch.equal(la[:, :2], lb[:, :2])  # before the first image: no image at all
    assert not torch.allclose(la[:, 2:5], lb[:, 2:5])  # the first image's text reads it
    # after the second image: "previous" reads the second image alone, "all" both (the LM's own layer mixes
    # the earlier tokens in too, so "previous" is compared on the gated block's output only)
    if mode == "all":
        assert not torch.allclose(la[:, 5:], lb[:, 5:])
    h_a = model.gated_cross_attn_layers[0](model.embed(x), *_media(model, x, a), None, 0)
    h_b = model.gated_cross_attn_layers[0](model.embed(x), *_media(model, x, b), None, 0)
    same_after = torch.allclose(h_a[:, 5:], h_b[:, 5:])
    assert same_after == (mode == "previous")
    assert torch.equal(h_a[:, :2], h_b[:, :2])


def _media(model, x, pixels):
    media = model.encode_media(pixels)
    B, M, L, D = media.shape
    allowed = media_mask(media_counts(x, IMG), M, model.cfg.media_attention)
    sees = allowed.any(-1)
    allowed = allowed | ~sees[..., None]
    return media.reshape(B, M * L, D), allowed.repeat_interleave(L, dim=-1)[:, None], sees


def test_text_only_prompts_run_and_frames_get_time_embeddings():
    torch.manual_seed(0)
    model = opened(Flamingo(tiny()))
    assert model(ids([5, 6, 7])).logits.shape == (1, 3, 50)
    video = torch.randn(1, 1, 2, 3, 16, 16)  # one media of two frames
    with torch.no_grad():
        model.perceiver.time_embeds.normal_()
    swapped = video.flip(2)  # the same frames in the other order
    x = ids([IMG, 5, 6])
    assert not torch.allclose(model(x, video).logits, model(x, swapped).logits)
    with pytest.raises(DataError, match="3 frames per media .*max_frames"):
        model(x, torch.randn(1, 1, 3, 3, 16, 16))


def test_cached_generation_equals_recomputation_and_batches_equal_one_by_one():
    torch.manual_seed(0)
    model = opened(Flamingo(tiny()))
    prompts = [[5, IMG, 7, 8, EOC, IMG], [IMG, 9, EOC, 11, 12, 13, EOC, IMG, 16]]
    images = torch.randn(2, 2, 3, 16, 16)
    cfg = GenerationConfig(max_new_tokens=6)
    singles = []
    for row, prompt in enumerate(prompts):
        x = torch.tensor([prompt])
        cached = model.generate(x, images[row : row + 1], config=cfg)
        slow = model.generate(
            x, images[row : row + 1], config=GenerationConfig(max_new_tokens=6, use_cache=False)
        )
        assert torch.equal(cached, slow)
        singles.append(cached[0])
    # left-padded batch, one row holding fewer images than the other would be padded the same way
    T = max(map(len, prompts))
    x = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    batched = model.generate(x, images, attention_mask=mask, config=cfg)
    for row in range(2):
        assert torch.equal(batched[row], singles[row])


def test_rows_with_fewer_images_pad_their_slots():
    torch.manual_seed(0)
    model = opened(Flamingo(tiny()))
    images = torch.randn(2, 2, 3, 16, 16)
    x = ids([IMG, 5, 6, EOC, IMG, 7], [5, IMG, 6, 7, 8, 9])
    out = model(x, images, num_media=torch.tensor([2, 1])).logits
    alone = model(x[1:], images[1:, :1]).logits
    torch.testing.assert_close(out[1:], alone, atol=1e-5, rtol=1e-5)


def test_a_right_padded_training_batch_equals_each_row_alone():
    """Training batches run packed (no compute on padding): each row's logits as when it is alone."""
    torch.manual_seed(0)
    model = opened(Flamingo(tiny()))
    rows = [[5, IMG, 7, 8, EOC, IMG, 9, 10, 11], [IMG, 12, 13, EOC]]
    images = torch.randn(2, 2, 3, 16, 16)
    T = max(map(len, rows))
    x = torch.tensor([r + [0] * (T - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows])
    out = model(x, images, mask, num_media=torch.tensor([2, 1]))
    for b, r in enumerate(rows):
        alone = model(torch.tensor([r]), images[b : b + 1, : r.count(IMG)]).logits[0]
        torch.testing.assert_close(out.logits[b, : len(r)], alone, atol=1e-5, rtol=1e-5)
    assert out.hidden[1, len(rows[1]) :].abs().sum() == 0  # nothing computed at the padding


def test_a_frozen_language_model_trains_only_the_new_rows_resampler_and_gates():
    torch.manual_seed(0)
    model = Flamingo(tiny())
    model.freeze(["vision_model", "language_model"])
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(
        n.startswith(("perceiver.", "gated_cross_attn_layers.", "new_token_")) for n in trained
    )
    x = ids([5, IMG, 7, 8, EOC, 9])
    out = model(x, torch.randn(1, 1, 3, 16, 16)).logits
    out.logsumexp(-1).sum().backward()
    assert model.new_token_embeds.grad.abs().sum() > 0 and model.new_token_head.grad.abs().sum() > 0
    # the gates are 0 at the start: the gradient still reaches them (d tanh(a) / da = 1 at 0)
    assert model.gated_cross_attn_layers[0].alpha_cross_attn.grad.abs().sum() > 0
    assert model.language_model.embed_tokens.weight.grad is None
    with pytest.raises(ConfigError, match="Flamingo's parts"):
        model.freeze(["decoder"])


def test_image_and_token_counts_must_agree():
    model = Flamingo(tiny()).eval()
    with pytest.raises(DataError, match="row 0 holds 2 <image> tokens .* but 1 images"):
        model(ids([IMG, 5, IMG]), torch.randn(1, 1, 3, 16, 16))
    with pytest.raises(DataError, match="row 0 holds 0 <image> tokens .* but 1 images"):
        model(ids([5, 6]), torch.randn(1, 1, 3, 16, 16))
    with pytest.raises(DataError, match="row 0 holds 1 <image> tokens .* but 0 images"):
        model(ids([IMG, 5]))


def test_registry_sizes_build():
    model = create_model("flamingo-tiny")
    assert model.cfg.perceiver.latents == 16 and len(model.gated_cross_attn_layers) == 4
    with torch.device("meta"):
        big = create_model("flamingo-B")
    assert len(big.gated_cross_attn_layers) == 4  # every 4th of 16 layers
    with pytest.raises(ConfigError, match="media_attention"):
        tiny(media_attention="next")

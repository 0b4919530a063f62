"""Idefics (transformers' Flamingo) folders load as vlmkit Flamingo models: logits within 1e-4 and greedy
generations token for token, on tiny random models with non-zero gates (at zero gates images change nothing
and parity would prove nothing)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from vlmkit.convert import load_pretrained  # noqa: E402
from vlmkit.errors import ConfigError  # noqa: E402
from vlmkit.models.flamingo import Flamingo, media_counts, media_mask  # noqa: E402
from vlmkit.models.generation import GenerationConfig  # noqa: E402

VOCAB = 96  # + 2 additional tokens: <fake_token_around_image> = 96, <image> = 97
IMG = VOCAB + 1


def hf_config(resampler: bool = True, interval: int = 2, alpha_type: str = "vector"):
    return transformers.IdeficsConfig(
        vocab_size=VOCAB, additional_vocab_size=2, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, max_position_embeddings=128, cross_layer_interval=interval,
        # "normal" with a float alpha crashes in transformers; the gates are set by hand below anyway
        alpha_initializer="normal" if alpha_type == "vector" else "zeros", alpha_type=alpha_type, alphas_initializer_range=0.8,
        use_resampler=resampler, freeze_text_layers=False, freeze_vision_layers=False,
        vision_config=dict(embed_dim=32, image_size=16, patch_size=8, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64),
        perceiver_config=dict(use_resampler=resampler, resampler_n_latents=4, resampler_depth=2,
                              resampler_n_heads=2, resampler_head_dim=16),
    )  # fmt: skip


def build(tmp_path, **kw):
    torch.manual_seed(0)
    hf = transformers.IdeficsForVisionText2Text(hf_config(**kw)).eval()
    with torch.no_grad():  # random non-zero gates (a "normal" init can land near 0 for some channels)
        for layer in hf.model.gated_cross_attn_layers:
            layer.alpha_cross_attn.uniform_(0.5, 1.5)
            layer.alpha_dense.uniform_(-1.0, 1.0)
    hf.save_pretrained(tmp_path / "hf")
    return hf, load_pretrained(tmp_path / "hf").model


def inputs():
    ids = torch.tensor(
        [[1, 96, IMG, 96, 10, 11, 12, 96, IMG, 96, 13, 14], [1, 20, 21, 96, IMG, 96, 22, 23, 96, IMG, 96, 24]]
    )
    pixels = torch.randn(2, 2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    mask = media_mask(media_counts(ids, IMG), 2, "previous").long()  # (B, T, M): the latest image
    return ids, pixels, mask


@pytest.mark.parametrize("kw", [{}, {"resampler": False, "interval": 1, "alpha_type": "float"}])
def test_logits_match_transformers(tmp_path, kw):
    hf, ours = build(tmp_path, **kw)
    assert isinstance(ours, Flamingo) and ours.cfg.image_token_id == IMG
    ids, pixels, mask = inputs()
    with torch.no_grad():
        theirs = hf(input_ids=ids, pixel_values=pixels, image_attention_mask=mask).logits
        mine = ours(ids, pixels).logits
    assert mine.shape == theirs.shape == (2, 12, VOCAB + 2)
    torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=1e-4)
    # the images matter here: other images, other logits
    with torch.no_grad():
        other = ours(ids, torch.randn_like(pixels)).logits
    assert (other - mine).abs().max() > 1e-3  # ten times the parity tolerance


def test_greedy_generation_matches_transformers_token_for_token(tmp_path):
    hf, ours = build(tmp_path)
    ids, pixels, mask = inputs()
    for row in range(2):
        x, px, m = ids[row : row + 1], pixels[row : row + 1], mask[row : row + 1]
        with torch.no_grad():
            theirs = hf.generate(
                input_ids=x, pixel_values=px, image_attention_mask=m, attention_mask=torch.ones_like(x),
                max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0,
            )[:, x.shape[1] :]  # fmt: skip
        mine = ours.generate(x, px, config=GenerationConfig(max_new_tokens=10))
        assert mine.tolist() == theirs.tolist()


def test_what_vlmkit_cannot_hold_is_one_line(tmp_path):
    from vlmkit.convert.idefics import config_from_hf_idefics

    meta = hf_config().to_dict()
    with pytest.raises(ConfigError, match="qk_layer_norms"):
        config_from_hf_idefics({**meta, "qk_layer_norms": True}, "config.json")
    with pytest.raises(ConfigError, match="cross_layer_interval 3 does not divide"):
        config_from_hf_idefics({**meta, "cross_layer_interval": 3}, "config.json")
    with pytest.raises(ConfigError, match="no tokenizer.json with an '<image>'"):
        config_from_hf_idefics({**meta, "additional_vocab_size": 0}, "config.json", tmp_path)

"""The fusion model: which passes read the image, masks, the decoder's causality, momentum and queue, saving."""

import pytest
import torch

from vlmkit.config import load_json
from vlmkit.errors import ConfigError
from vlmkit.models.pretrained import load_vlmkit, save_pretrained
from vlmkit.models.registry import create_model, get_model_config

SMALL = {
    "vision.image_size": 32,
    "vision.layers": 1,
    "vision.width": 32,
    "vision.heads": 2,
    "text.layers": 2,
    "text.fusion_start": 1,
    "text.width": 32,
    "text.heads": 2,
    "text.vocab_size": 60,
    "text.mask_token_id": 3,
    "embed_dim": 16,
}
PAD = 0


def model(**overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("fusion-tiny", **{**SMALL, **overrides}).double().eval()


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(3, 3, 32, 32, generator=g, dtype=torch.float64)
    text = torch.randint(4, 60, (3, 9), generator=g)
    text[1, 6:], text[2, 4:] = PAD, PAD
    return images, text


@pytest.mark.parametrize("start", [0, 1])
def test_text_only_pass_ignores_the_image_and_the_fused_pass_reads_it(start):
    m = model(**{"text.fusion_start": start})
    images, text = batch()
    other = torch.randn_like(images)
    hidden = m.text_hidden(text)
    assert m.encode_text(text).norm(dim=-1).sub(1).abs().max() < 1e-12
    a = m.fuse(text, m.encode_image_tokens(images))
    b = m.fuse(text, m.encode_image_tokens(other))
    assert (a - b).abs().max() > 1e-3
    # ALBEF: the fused pass continues from the text-only pass; reusing it gives the same result
    if start:
        torch.testing.assert_close(m.fuse(text, m.encode_image_tokens(images), text_hidden=hidden), a)
    # padding is invisible: more pad tokens change nothing at the real tokens
    padded = torch.cat([text, torch.full((3, 3), PAD)], dim=1)
    torch.testing.assert_close(m.text_hidden(padded)[:, :9][text != PAD], hidden[text != PAD])
    torch.testing.assert_close(m.itm_logits(padded, m.encode_image_tokens(images)), m.itm_head(a[:, 0]))


def test_blip_layout_text_only_pass_is_every_layer_without_cross_attention():
    m = model(**{"text.fusion_start": 0})
    _, text = batch()
    x = m.text.embed(text)
    from vlmkit.nn.transformer import padding_mask

    for block in m.text.blocks:
        assert block.cross_attn is not None
        x = block(x, attn_mask=padding_mask((text != PAD).long(), False))
    torch.testing.assert_close(m.text_hidden(text), x)


def test_enc_token_replaces_the_first_token_of_the_multimodal_pass_only():
    m = model(**{"text.fusion_start": 0, "text.enc_token_id": 2})
    images, text = batch()
    tokens = m.encode_image_tokens(images)
    swapped = text.clone()
    swapped[:, 0] = 2
    torch.testing.assert_close(m.fuse(text, tokens), m.fuse(swapped, tokens))
    assert (m.text_hidden(text) - m.text_hidden(swapped)).abs().max() > 1e-6


def test_decoder_is_causal_and_reads_the_image():
    m = model()
    images, text = batch()
    tokens = m.encode_image_tokens(images)
    logits = m.decode(text, tokens)
    changed = text.clone()
    changed[:, 5:] = 7
    torch.testing.assert_close(m.decode(changed, tokens)[:, :5], logits[:, :5])
    assert (
        m.decode(text, m.encode_image_tokens(torch.randn_like(images)))[:, 0] - logits[:, 0]
    ).abs().max() > 1e-4


def test_merged_variant_attends_over_image_and_text_tokens():
    m = model(**{"fusion": "merged", "text_decoder": False, "caption_weight": 0.0, "text.fusion_start": 1})
    images, text = batch()
    a = m.itm_logits(text, m.encode_image_tokens(images))
    b = m.itm_logits(text, m.encode_image_tokens(torch.randn_like(images)))
    assert a.shape == (3, 2) and (a - b).abs().max() > 1e-4
    assert all(block.cross_attn is None for block in m.text.blocks)


def test_momentum_update_and_queue():
    m = model(momentum=0.9, queue_size=5)
    for name, target in m.momentum_encoder.items():  # starts as a copy
        for p_m, p in zip(target.parameters(), getattr(m, name).parameters(), strict=True):
            torch.testing.assert_close(p_m, p)
    before = {n: p.clone() for n, p in m.momentum_encoder.named_parameters()}
    with torch.no_grad():
        for p in m.text.parameters():
            p.add_(1.0)
    m.momentum_update()
    online = dict(m.named_parameters())
    for n, p_m in m.momentum_encoder.named_parameters():
        torch.testing.assert_close(p_m, 0.9 * before[n] + 0.1 * online[n])
    assert all(not p.requires_grad for p in m.momentum_encoder.parameters())
    images, text = batch()
    image_m, text_m = m.momentum_features(images, text)
    m.enqueue(image_m, text_m, torch.tensor([[1, 1], [2, 2], [3, 3]]))
    m.enqueue(image_m, text_m, torch.tensor([[4, 4], [5, 5], [6, 6]]))  # wraps around
    assert m.queue_ptr.item() == 1
    assert m.id_queue[:, 0].tolist() == [6, 2, 3, 4, 5]
    torch.testing.assert_close(m.image_queue[0], image_m[2].to(m.image_queue.dtype))


def test_save_and_load_round_trip(tmp_path):
    m = model(mim=True, mim_weight=1.0, momentum=0.5, queue_size=4).float()
    save_pretrained(m, tmp_path)
    loaded = load_vlmkit(tmp_path, load_json(tmp_path / "config.json")).model
    images, text = batch()
    images = images.float()
    torch.testing.assert_close(
        loaded.itm_logits(text, loaded.encode_image_tokens(images)),
        m.itm_logits(text, m.encode_image_tokens(images)),
    )
    assert loaded.cfg == m.cfg


def test_config_errors_are_one_line():
    with pytest.raises(ConfigError, match="fusion_start"):
        get_model_config("fusion-tiny", **{"text.fusion_start": 9})
    with pytest.raises(ConfigError, match="merged.*fusion_start > 0"):
        get_model_config(
            "fusion-tiny", fusion="merged", text_decoder=False, caption_weight=0, **{"text.fusion_start": 0}
        )
    with pytest.raises(ConfigError, match="caption_weight > 0 needs text_decoder"):
        get_model_config("fusion-tiny", text_decoder=False)
    with pytest.raises(ConfigError, match="queue_size > 0 needs momentum"):
        get_model_config("fusion-tiny", queue_size=8)
    with pytest.raises(ConfigError, match="mim_weight > 0 needs mim"):
        get_model_config("fusion-tiny", mim_weight=1.0)

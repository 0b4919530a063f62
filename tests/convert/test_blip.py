"""BLIP retrieval parity both ways: a random transformers BlipForImageTextRetrieval and vlmkit's fusion model give
the same ITM logits and ITC similarities (fp32, within 1e-5)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from vlmkit.convert import load_pretrained  # noqa: E402
from vlmkit.convert.blip import config_to_hf, save_hf_blip  # noqa: E402
from vlmkit.errors import ConfigError  # noqa: E402
from vlmkit.models.registry import create_model  # noqa: E402


def hf_model():
    from transformers import BlipConfig, BlipForImageTextRetrieval

    torch.manual_seed(0)
    cfg = BlipConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8, layer_norm_eps=1e-5),
        text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=40, layer_norm_eps=1e-12),
        image_text_hidden_size=16,
    )  # fmt: skip
    model = BlipForImageTextRetrieval(cfg).eval()
    with torch.no_grad():  # random norms and biases too, so that no term is a no-op
        for name, p in model.named_parameters():
            if p.ndim == 1 or "embedding" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def inputs():
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(3, 3, 32, 32, generator=g)
    ids = torch.randint(5, 99, (3, 10), generator=g)
    ids[:, 0] = 1
    mask = torch.ones_like(ids)
    mask[1, 7:], mask[2, 4:] = 0, 0
    ids[mask == 0] = 0  # BERT's pad id
    return pixels, ids, mask


def hf_outputs(model, pixels, ids, mask):
    with torch.no_grad():
        itm = model(input_ids=ids, pixel_values=pixels, attention_mask=mask, use_itm_head=True).itm_score
        sim = model(input_ids=ids, pixel_values=pixels, attention_mask=mask, use_itm_head=False).itm_score
    return itm, sim


def ours_outputs(model, pixels, ids):
    with torch.no_grad():
        tokens = model.encode_image_tokens(pixels)
        itm = model.itm_logits(ids, tokens)
        sim = model.image_embedding(tokens) @ model.encode_text(ids).T
    return itm, sim


def test_import_matches_transformers(tmp_path):
    hf = hf_model()
    hf.save_pretrained(tmp_path)
    pt = load_pretrained(tmp_path)
    assert type(pt.model).__name__ == "Fusion" and pt.model.cfg.text.fusion_start == 0
    pixels, ids, mask = inputs()
    want_itm, want_sim = hf_outputs(hf, pixels, ids, mask)
    got_itm, got_sim = ours_outputs(pt.model, pixels, ids)
    torch.testing.assert_close(got_itm, want_itm, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_sim, want_sim, rtol=0, atol=1e-5)
    assert (want_itm[:, 1] - want_itm[:, 0]).abs().max() > 1e-3  # the comparison is of different numbers


def test_export_loads_in_transformers_with_the_same_outputs(tmp_path):
    from transformers import BlipForImageTextRetrieval

    spec = {"vision.image_size": 32, "vision.layers": 2, "vision.width": 32, "vision.heads": 4,
            "text.layers": 2, "text.width": 32, "text.heads": 4, "text.vocab_size": 99, "text.context_length": 40,
            "text.fusion_start": 0, "text.post_norm": True, "text.norm_eps": 1e-12, "embed_dim": 16}  # fmt: skip
    torch.manual_seed(0)
    ours = create_model("fusion-tiny", **spec).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_hf_blip(ours, tmp_path)
    hf = BlipForImageTextRetrieval.from_pretrained(tmp_path).eval()
    pixels, ids, mask = inputs()
    want_itm, want_sim = ours_outputs(ours, pixels, ids)
    got_itm, got_sim = hf_outputs(hf, pixels, ids, mask)
    torch.testing.assert_close(got_itm, want_itm, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_sim, want_sim, rtol=0, atol=1e-5)


def test_a_model_without_a_blip_equivalent_is_refused():
    with pytest.raises(ConfigError, match="no BlipForImageTextRetrieval equivalent.*post-norm"):
        config_to_hf(create_model("fusion-tiny").cfg)

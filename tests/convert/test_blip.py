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


def blip_tokenizer(directory):
    """A BERT WordPiece tokenizer as BLIP's processor has it: [DEC] as bos_token, [ENC] added."""
    from transformers import BertTokenizerFast

    words = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        "a",
        "red",
        "blue",
        "circle",
        "square",
        "left",
        "of",
    ]
    words += [
        f"w{i}" for i in range(80)
    ]  # 92 words, then [DEC] 92 and [ENC] 93: inside the 99-row vocabulary
    (directory / "vocab.txt").write_text("\n".join(words) + "\n")
    tok = BertTokenizerFast(vocab_file=str(directory / "vocab.txt"))
    tok.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    return tok


def test_a_blip_folder_with_its_tokenizer_scores_as_blip_does_and_exports_back(tmp_path):
    """BLIP's own code puts [ENC] in place of [CLS] for ITM and keeps [CLS] for ITC; transformers leaves the
    swap to the caller. The import reads the tokenizer ([CLS] text [SEP], as transformers' ids) and its
    [ENC]; the export writes a tokenizer transformers loads with the same ids."""
    from transformers import AutoTokenizer

    hf, hf_tok = hf_model(), blip_tokenizer(tmp_path)
    hf.save_pretrained(tmp_path / "blip")
    hf_tok.save_pretrained(tmp_path / "blip")
    pt = load_pretrained(tmp_path / "blip")
    texts = ["a red circle left of a blue square", "a blue square", "w3 w4 w5 red"]
    enc = hf_tok.convert_tokens_to_ids("[ENC]")
    want_ids = hf_tok(texts, padding="max_length", max_length=12, truncation=True, return_tensors="pt")
    ids = pt.tokenizer.with_context_length(12)(texts)
    assert torch.equal(ids, want_ids["input_ids"]) and ids[0, 0].item() == hf_tok.cls_token_id
    assert pt.model.cfg.text.enc_token_id == enc and pt.model.cfg.text.dec_token_id == hf_tok.bos_token_id

    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    mask = want_ids["attention_mask"]
    itm_ids = ids.clone()
    itm_ids[:, 0] = enc  # what BLIP's own code does before ITM
    want_itm, _ = hf_outputs(hf, pixels, itm_ids, mask)
    _, want_sim = hf_outputs(hf, pixels, ids, mask)
    got_itm, got_sim = ours_outputs(pt.model, pixels, ids)  # vlmkit swaps in [ENC] itself
    torch.testing.assert_close(got_itm, want_itm, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_sim, want_sim, rtol=0, atol=1e-5)
    plain_itm, _ = hf_outputs(hf, pixels, ids, mask)
    assert (plain_itm - want_itm).abs().max() > 1e-3  # [ENC] matters: the check above is not vacuous

    out = save_hf_blip(pt.model, tmp_path / "export", pt.tokenizer)
    back = AutoTokenizer.from_pretrained(out)
    got = back(texts, padding="max_length", max_length=12, truncation=True, return_tensors="pt")["input_ids"]
    assert torch.equal(got, want_ids["input_ids"])
    assert back.cls_token == "[CLS]" and back.sep_token == "[SEP]"
    again = load_pretrained(out)  # and vlmkit reads its own export, [ENC] included
    assert again.model.cfg.text.enc_token_id == enc
    torch.testing.assert_close(ours_outputs(again.model, pixels, ids)[0], want_itm, rtol=0, atol=1e-5)
    from vlmkit.models.pretrained import save_pretrained

    # a vlmkit folder (tokenizer.json alone) keeps the [CLS] ... [SEP] framing and the [ENC] swap
    native = load_pretrained(save_pretrained(pt.model, tmp_path / "native", pt.tokenizer, pt.preprocess))
    assert torch.equal(native.tokenizer.with_context_length(12)(texts), want_ids["input_ids"])
    torch.testing.assert_close(ours_outputs(native.model, pixels, ids)[0], want_itm, rtol=0, atol=1e-5)

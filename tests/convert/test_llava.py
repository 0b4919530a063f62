"""LLaVA: Hugging Face import / export parity (logits, greedy generation), pixel shuffle, placeholders, freezing."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

transformers = pytest.importorskip("transformers")

from vlmkit.convert.clip import is_hf_dir, load_hf  # noqa: E402
from vlmkit.convert.llava import is_hf_llava_dir, load_hf_llava, save_hf_llava  # noqa: E402
from vlmkit.data.chat import IMAGE_TOKEN, collate, render  # noqa: E402
from vlmkit.data.tokenizer import Tokenizer  # noqa: E402
from vlmkit.errors import ConfigError, DataError  # noqa: E402
from vlmkit.losses.captioning import next_token_loss  # noqa: E402
from vlmkit.models.decoder import DecoderConfig  # noqa: E402
from vlmkit.models.generation import GenerationConfig  # noqa: E402
from vlmkit.models.llava import Llava, LlavaConfig, pixel_shuffle  # noqa: E402
from vlmkit.models.vit import VisionConfig  # noqa: E402

IMAGE_ID = 99
VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=32,
    patch_size=8,
)
TEXT = dict(
    vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, pad_token_id=0,
)  # fmt: skip


def hf_llava(kind: str = "clip", text=None, **config):
    """A tiny random LlavaForConditionalGeneration with weights large enough to make outputs non-trivial."""
    torch.manual_seed(0)
    if kind == "clip":
        vision = transformers.CLIPVisionConfig(**VISION)
    else:
        vision = transformers.SiglipVisionConfig(**VISION)
        config.setdefault("vision_feature_select_strategy", "full")
    cfg = transformers.LlavaConfig(
        vision_config=vision,
        text_config=transformers.LlamaConfig(**{**TEXT, **(text or {})}),
        image_token_index=IMAGE_ID,
        **config,
    )
    model = transformers.LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:  # keep norms near 1, give everything else a larger spread
                p.normal_(0, 0.15 if p.ndim > 1 else 0.05)
    return model


def prompts(num_image_tokens: int):
    """Two rows, left padded (row 0 is 3 tokens shorter), each with one image's placeholders."""
    g = torch.Generator().manual_seed(1)
    rows = [
        [1, 5, *[IMAGE_ID] * num_image_tokens, *torch.randint(3, IMAGE_ID, (6,), generator=g).tolist()],
        [1, *torch.randint(3, IMAGE_ID, (3,), generator=g).tolist(), *[IMAGE_ID] * num_image_tokens]
        + torch.randint(3, IMAGE_ID, (5,), generator=g).tolist(),
    ]
    T = max(map(len, rows))
    ids = torch.tensor([[0] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    return ids, mask, torch.randn(2, 3, 32, 32, generator=g)


def assert_same_outputs(hf, ours, new_tokens: int = 12):
    ids, mask, pixels = prompts(ours.num_image_tokens)
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits
        got = ours(ids, pixels, attention_mask=mask).logits
    real = mask.bool()
    assert ref.std() > 0.5  # the comparison means something
    torch.testing.assert_close(got[real], ref[real], atol=1e-4, rtol=0)
    expected = hf.generate(
        input_ids=ids, pixel_values=pixels, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
        min_length=0, eos_token_id=None, pad_token_id=0,
    )[:, ids.shape[1] :]  # fmt: skip
    generated = ours.generate(
        ids, pixels, attention_mask=mask, config=GenerationConfig(max_new_tokens=new_tokens)
    )
    assert generated.tolist() == expected.tolist()


@pytest.mark.parametrize(
    "kind, config",
    [
        ("clip", {}),
        # SigLIP, last layer, tanh-GELU projector without bias, tied embeddings
        (
            "siglip",
            dict(
                vision_feature_layer=-1,
                projector_hidden_act="gelu_pytorch_tanh",
                multimodal_projector_bias=False,
                tie_word_embeddings=True,
            ),
        ),
        # two layers' tokens concatenated (the embeddings and the last block's), as some LLaVA variants read
        ("clip", dict(vision_feature_layer=[0, -1])),
    ],  # fmt: skip
)
def test_import_matches_transformers(tmp_path, kind, config):
    hf = hf_llava(kind, text=dict(tie_word_embeddings=config.get("tie_word_embeddings", False)), **config)
    hf.save_pretrained(tmp_path)
    assert is_hf_llava_dir(tmp_path) and is_hf_dir(tmp_path)
    pt = load_hf_llava(tmp_path)
    assert pt.tokenizer is None and pt.preprocess.image_size == 32
    assert pt.model.num_image_tokens == 16
    assert_same_outputs(hf, pt.model)
    assert type(load_hf(tmp_path).model) is Llava  # the generic loader dispatches on model_type


def test_export_round_trip(tmp_path):
    hf = hf_llava("clip", text=dict(vocab_size=300))  # room for a byte-level BPE tokenizer
    hf.save_pretrained(tmp_path / "hf")
    pt = load_hf_llava(tmp_path / "hf")
    tok = Tokenizer.train(["a red circle", "a blue square"] * 4, vocab_size=270, context_length=16,
                          extra_special_tokens=[IMAGE_TOKEN])  # fmt: skip
    save_hf_llava(pt.model, tmp_path / "out", tokenizer=tok, preprocess=pt.preprocess)
    again = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    ids, mask, pixels = prompts(16)
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits
        torch.testing.assert_close(again(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits, ref)
    back = load_hf_llava(tmp_path / "out")
    assert back.tokenizer.encode("a red circle") == tok.encode("a red circle")
    assert back.tokenizer.token_to_id(IMAGE_TOKEN) == 3 and back.preprocess == pt.preprocess
    for (name, a), b in zip(pt.model.state_dict().items(), back.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_reads_sharded_and_in_memory_names(tmp_path):
    hf = hf_llava("clip")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    # transformers 5's in-memory names: model.language_model.*, lm_head.weight, model.vision_tower.*
    (tmp_path / "memory").mkdir()
    save_file(
        {k: v.contiguous() for k, v in hf.state_dict().items()},
        str(tmp_path / "memory" / "model.safetensors"),
    )
    (tmp_path / "memory" / "config.json").write_text(hf.config.to_json_string())
    a, b = load_hf_llava(tmp_path / "sharded").model, load_hf_llava(tmp_path / "memory").model
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    assert_same_outputs(hf, a, new_tokens=2)


def test_unrepresentable_configs_are_rejected(tmp_path):
    hf = hf_llava("clip")
    hf.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    for key, value, match in [
        ("vision_feature_layer", "last", "vision_feature_layer"),
        ("vision_feature_layer", [], "vision_feature_layer"),
        ("projector_hidden_act", "relu2", "projector_hidden_act"),
        ("vision_feature_select_strategy", "cls", "vision_feature_select_strategy"),
    ]:
        (tmp_path / "config.json").write_text(json.dumps({**meta, key: value}))
        with pytest.raises(ConfigError, match=match):
            load_hf_llava(tmp_path)
    siglip = {**meta, "vision_config": {**meta["vision_config"], "model_type": "siglip_vision_model"}}
    (tmp_path / "config.json").write_text(json.dumps(siglip))  # 'default' would drop a SigLIP patch
    with pytest.raises(ConfigError, match="vision_feature_select_strategy 'default'"):
        load_hf_llava(tmp_path)
    shuffled = Llava(LlavaConfig(vision=tiny_vision(), decoder=tiny_decoder(), pixel_shuffle=2))
    with pytest.raises(ConfigError, match="pixel_shuffle"):
        save_hf_llava(shuffled, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def tiny_vision(**kw) -> VisionConfig:
    return VisionConfig(image_size=32, patch_size=8, width=32, layers=2, heads=2, **kw)


def tiny_decoder(vocab_size: int = 100) -> DecoderConfig:
    return DecoderConfig(vocab_size=vocab_size, width=64, layers=1, heads=4, max_seq_len=64)


def test_pixel_shuffle():
    x = torch.arange(4 * 4 * 2, dtype=torch.float).view(
        1, 16, 2
    )  # a 4x4 grid, token (r, c) = 2 * (4r + c) + ch
    y = pixel_shuffle(x, (4, 4), 2)  # (1, 4, 8)
    # output token 1 is the block at rows 0-1, columns 2-3: tokens (0,2), (0,3), (1,2), (1,3)
    assert y[0, 1].tolist() == [4, 5, 6, 7, 12, 13, 14, 15]
    assert y[0, 2].tolist() == [16, 17, 18, 19, 24, 25, 26, 27]
    model = Llava(LlavaConfig(vision=tiny_vision(), decoder=tiny_decoder(), pixel_shuffle=2))
    assert model.num_image_tokens == 4
    assert model.encode_images(torch.randn(3, 3, 32, 32)).shape == (3, 4, 64)
    assert model.projector.linear_1.in_features == 4 * 32
    with pytest.raises(ConfigError, match="pixel_shuffle 3 does not divide the 4x4"):
        LlavaConfig(vision=tiny_vision(), decoder=tiny_decoder(), pixel_shuffle=3)


def test_placeholder_count_mismatch():
    model = Llava(LlavaConfig(vision=tiny_vision(), decoder=tiny_decoder(), image_token_id=3))
    ids = torch.tensor([[1, *[3] * 15, 7]])  # one placeholder short
    with pytest.raises(DataError, match="15 image placeholder tokens .* 1 images give 16"):
        model(ids, torch.randn(1, 3, 32, 32))
    with pytest.raises(DataError, match="0 images"):
        model(torch.tensor([[1, *[3] * 16]]))


def test_training_step_on_a_rendered_chat_with_freezing():
    torch.manual_seed(0)
    tok = Tokenizer.train(["what colour is it? red", "what shape? a circle"] * 4, vocab_size=280,
                          context_length=16, extra_special_tokens=[IMAGE_TOKEN])  # fmt: skip
    cfg = LlavaConfig(
        vision=tiny_vision(), decoder=tiny_decoder(300), image_token_id=tok.token_to_id(IMAGE_TOKEN)
    )
    model = Llava(cfg)
    chats = [
        [{"from": "human", "value": "<image>\nwhat colour is it?"}, {"from": "gpt", "value": "red"}],
        [{"from": "human", "value": "what shape?\n<image>"}, {"from": "gpt", "value": "a circle"}],
    ]
    kw = dict(num_image_tokens=model.num_image_tokens, image_token_id=model.cfg.image_token_id)
    batch = collate([render(c, tok, "vicuna", **kw) for c in chats], tok.pad_token_id)
    model.freeze(["vision_tower", "language_model"])  # LLaVA stage 1: only the projector learns
    out = model(batch["input_ids"], torch.randn(2, 3, 32, 32), batch["attention_mask"], logits="none")
    next_token_loss(out.hidden, batch["labels"], model.language_model.lm_head).backward()
    trained = {n.split(".")[0] for n, p in model.named_parameters() if p.grad is not None}
    assert trained == {"projector"}
    assert all(p.requires_grad == n.startswith("projector.") for n, p in model.named_parameters())
    with pytest.raises(ConfigError, match="cannot freeze"):
        model.freeze(["vision"])


def test_several_feature_layers_are_concatenated():
    cfg = LlavaConfig(vision=tiny_vision(), decoder=tiny_decoder(), vision_feature_layer=[1, -1])
    assert cfg.vision_feature_layer == (1, -1) and cfg.feature_layers == (1, -1)
    model = Llava(cfg).eval()
    assert model.projector.linear_1.in_features == 2 * 32
    images = torch.randn(2, 3, 32, 32)
    tower = model.vision_tower
    with torch.no_grad():
        both = tower.forward_hidden(images, (1, -1))
        torch.testing.assert_close(
            both, torch.cat([tower.forward_hidden(images, 1), tower.forward_hidden(images, 2)], -1)
        )
        assert model.encode_images(images).shape == (2, 16, 64)
    assert model.unused_parameter_names() == ["vision_tower.ln_post.weight", "vision_tower.ln_post.bias"]
    assert (
        LlavaConfig(
            vision=tiny_vision(), decoder=tiny_decoder(), vision_feature_layer=[1]
        ).vision_feature_layer
        == 1
    )
    with pytest.raises(ConfigError, match="vision_feature_layer 3 does not exist"):
        LlavaConfig(vision=tiny_vision(), decoder=tiny_decoder(), vision_feature_layer=[0, 3])

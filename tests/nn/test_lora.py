"""LoRA as a weight parametrization: the maths against float64, every forward path, merging, bad targets."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vlmkit.errors import ConfigError
from vlmkit.models import create_model
from vlmkit.nn.lora import (
    adapted_modules,
    add_lora,
    find_targets,
    load_lora_state_dict,
    lora_state_dict,
    merge_lora,
    merged_copy,
    merged_state_dict,
)

TINY = {
    "text.vocab_size": 50,
    "text.context_length": 8,
    "vision.image_size": 32,
    "vision.layers": 2,
    "text.layers": 2,
    "vision.width": 32,
    "text.width": 32,
    "vision.heads": 2,
    "text.heads": 2,
    "embed_dim": 16,
}


def _randomise_adapters(model: nn.Module, seed: int = 1) -> None:
    """B starts at zero (a no-op); give every adapter a non-zero update, as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in adapted_modules(model).values():
            lora = m.parametrizations.weight[0]
            lora.lora_B.copy_(torch.randn(lora.lora_B.shape, generator=g) * 0.1)


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(3, 3, 32, 32, generator=g)
    tokens = torch.randint(3, 50, (3, 8), generator=g)
    tokens[:, -1] = 2  # the end-of-text token the tower pools at
    return images, tokens


def test_lora_linear_equals_a_float64_recomputation():
    torch.manual_seed(0)
    linear = nn.Linear(12, 20)
    w, b = linear.weight.detach().double().clone(), linear.bias.detach().double().clone()
    holder = nn.Sequential(linear)  # targets are found by module name; a lone root has none
    assert add_lora(holder, pattern=r"^0$", rank=3, alpha=6.0) == ["0"]
    lora = linear.parametrizations.weight[0]
    with torch.no_grad():
        lora.lora_B.normal_()
    x = torch.randn(5, 12)
    expected = x.double() @ (w + 2.0 * lora.lora_B.double() @ lora.lora_A.double()).T + b  # alpha / rank = 2
    torch.testing.assert_close(linear(x).double(), expected, rtol=1e-5, atol=1e-5)
    # The base weight is frozen and untouched; only the factors train.
    assert not linear.parametrizations.weight.original.requires_grad
    assert torch.equal(linear.parametrizations.weight.original.double(), w)
    assert {n for n, p in holder.named_parameters() if p.requires_grad} == {
        "0.bias",
        "0.parametrizations.weight.0.lora_A",
        "0.parametrizations.weight.0.lora_B",
    }


def test_fresh_adapters_leave_the_model_unchanged():
    torch.manual_seed(0)
    model = create_model("clip-tiny", **TINY).eval()
    images, tokens = _inputs()
    before = model.encode_image(images), model.encode_text(tokens)
    add_lora(model, rank=4)
    assert torch.equal(model.encode_image(images), before[0])
    assert torch.equal(model.encode_text(tokens), before[1])


def test_default_targets_are_the_attention_and_mlp_linears_of_both_towers():
    model = create_model("siglip-tiny", **{**TINY, "embed_dim": 32})
    names = find_targets(model)
    assert len(names) == 2 * 2 * 4  # 2 towers x 2 blocks x (qkv, proj, fc1, fc2)
    assert "visual.transformer.blocks.1.attn.qkv" in names and "text.transformer.blocks.0.mlp.fc2" in names
    assert not any("attn_pool" in n or n.endswith("proj") and "blocks" not in n for n in names)


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_merged_model_equals_the_adapted_model_on_every_path(pool):
    # pool "cls" runs the last vision block through Block.forward_one, which reads attn.qkv.weight
    # directly with F.linear; pool "mean" runs every block's forward.
    torch.manual_seed(0)
    model = create_model("clip-tiny", **{**TINY, "vision.pool": pool}).eval()
    add_lora(model, rank=4, alpha=8.0)
    _randomise_adapters(model)
    images, tokens = _inputs()
    adapted = model.encode_image(images), model.encode_text(tokens)
    # an independent reference: the same weights merged by hand in float64, in a plain model
    plain = create_model("clip-tiny", **{**TINY, "vision.pool": pool}).eval()
    ref = {k: v for k, v in model.state_dict().items() if ".parametrizations." not in k}
    for name, m in adapted_modules(model).items():
        lora = m.parametrizations.weight[0]
        w = m.parametrizations.weight.original.double() + 2.0 * lora.lora_B.double() @ lora.lora_A.double()
        ref[f"{name}.weight"] = w.float()
    plain.load_state_dict(ref)
    torch.testing.assert_close(plain.encode_image(images), adapted[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain.encode_text(tokens), adapted[1], rtol=1e-5, atol=1e-5)
    # merged_copy / merged_state_dict give plain weights with the same outputs, the model unchanged
    copy = merged_copy(model).eval()
    assert not adapted_modules(copy) and set(copy.state_dict()) == set(plain.state_dict())
    torch.testing.assert_close(copy.encode_image(images), adapted[0], rtol=1e-5, atol=1e-5)
    assert set(merged_state_dict(model)) == set(plain.state_dict()) and adapted_modules(model)
    # merge_lora folds the adapters in place
    merge_lora(model)
    assert not adapted_modules(model) and set(model.state_dict()) == set(plain.state_dict())
    torch.testing.assert_close(model.encode_text(tokens), adapted[1], rtol=1e-5, atol=1e-5)


def test_adapter_state_round_trips():
    torch.manual_seed(0)
    a, b = create_model("clip-tiny", **TINY), create_model("clip-tiny", **TINY)
    b.load_state_dict(a.state_dict())
    add_lora(a, rank=2)
    add_lora(b, rank=2)
    _randomise_adapters(a)
    state = lora_state_dict(a)
    assert len(state) == 2 * len(adapted_modules(a))
    load_lora_state_dict(b, state)
    images, _ = _inputs()
    assert torch.equal(a.eval().encode_image(images), b.eval().encode_image(images))
    c = create_model("clip-tiny", **TINY)
    add_lora(c, rank=3)
    with pytest.raises(ConfigError, match="lora_rank"):
        load_lora_state_dict(c, state)


@pytest.mark.parametrize(
    "pattern, message",
    [
        (r"attn$", r"matches visual\.transformer\.blocks\.0\.attn \(Attention\); LoRA adapts nn\.Linear"),
        (r"ln_1$", r"\(LayerNorm\)"),
        (r"blocks\.\d+\.attn\.qkvz$", r"matches no module"),
        (r"attn\.(qkv", r"not a valid regular expression"),
    ],
)
def test_bad_targets_raise_one_clear_error(pattern, message):
    model = create_model("clip-tiny", **TINY)
    with pytest.raises(ConfigError, match=message) as e:
        add_lora(model, pattern=pattern)
    assert "\n" not in str(e.value) and repr(pattern) in str(e.value)
    assert not adapted_modules(model)


def test_bad_rank_and_alpha():
    model = create_model("clip-tiny", **TINY)
    with pytest.raises(ConfigError, match="lora_rank"):
        add_lora(model, rank=0)
    with pytest.raises(ConfigError, match="lora_alpha"):
        add_lora(model, rank=2, alpha=-1.0)

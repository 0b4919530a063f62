"""Llama-style Decoder + KVCache + HF Llama converter: parity with transformers' LlamaForCausalLM on the same
weights (both directions of conversion), cache == full forward, reorder, and cross-attention against a
float64 recomputation written out here."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vlmkit.convert.llama import (
    decoder_config_from_hf,
    decoder_config_to_hf,
    decoder_state_from_hf,
    decoder_state_to_hf,
)
from vlmkit.errors import ConfigError
from vlmkit.models.decoder import Decoder, DecoderConfig, right_padded_packing

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=97, width=64, layers=2, heads=4, kv_heads=2, mlp_hidden=96)


def tiny_hf(tie: bool, seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_theta=500.0,  # not the default, so a dropped theta fails the test
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie,
        pad_token_id=0,
    )
    cfg._attn_implementation = "eager"  # the explicit-softmax path: independent of SDPA
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # weights larger than the 0.02 init, and norms away from 1, so every term matters
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    return model


def left_padded_batch(seed: int = 1, B: int = 3, T: int = 9):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :3] = 0  # row 1: 3 pads on the left
    mask[2, :6] = 0  # row 2: 6 pads on the left
    ids[mask == 0] = 0
    return ids, mask


def hf_position_ids(mask):
    return (mask.cumsum(-1) - 1).clamp(min=0)


@pytest.mark.parametrize("tie", [False, True])
def test_logits_match_transformers_llama(tie):
    hf = tiny_hf(tie)
    cfg = decoder_config_from_hf(hf.config.to_dict())
    assert (cfg.kv_heads, cfg.mlp_hidden, cfg.rope_theta, cfg.tie_embeddings) == (2, 96, 500.0, tie)
    model = Decoder(cfg).eval()
    model.load_state_dict(decoder_state_from_hf(hf.state_dict(), "model."))
    if tie:
        assert model.lm_head.weight is model.embed_tokens.weight
        # checkpoints saved tied have no lm_head.weight: the converter fills it from the embedding
        state = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
        model.load_state_dict(decoder_state_from_hf(state, "model."))
    ids, mask = left_padded_batch()
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        ours = model(ids).logits
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
        # left padding: HF needs the positions from the mask given explicitly; compare real tokens only
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=hf_position_ids(mask)).logits
        out = model(ids, attention_mask=mask)
        assert torch.isfinite(out.logits).all()  # padded queries give finite values, not NaN
        real = mask.bool()
        torch.testing.assert_close(out.logits[real], ref[real], atol=1e-5, rtol=0)
        last = model(ids, attention_mask=mask, logits="last").logits
        torch.testing.assert_close(last, out.logits[:, -1:], atol=1e-6, rtol=0)


@pytest.mark.parametrize("tie", [False, True])
def test_export_to_transformers(tie):
    torch.manual_seed(2)
    cfg = DecoderConfig(**TINY, tie_embeddings=tie, rope_theta=300.0, attention_bias=True, mlp_bias=True)
    model = Decoder(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    hf_cfg = transformers.LlamaConfig(**decoder_config_to_hf(cfg))
    hf_cfg._attn_implementation = "eager"
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    state = decoder_state_to_hf(model.state_dict(), "model.", tie_embeddings=tie)
    assert ("lm_head.weight" in state) is not tie
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if tie else set())
    if tie:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    ids, mask = left_padded_batch(seed=3)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=hf_position_ids(mask)).logits
        ours = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(ours[mask.bool()], ref[mask.bool()], atol=1e-5, rtol=0)
    # and the round trip of the config
    back = decoder_config_from_hf(decoder_config_to_hf(cfg))
    assert back == cfg


def test_config_converter_rejects_what_it_cannot_represent():
    base = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, intermediate_size=96).to_dict()
    with pytest.raises(ConfigError, match="rope_scaling"):
        decoder_config_from_hf(
            {**base, "rope_parameters": None, "rope_scaling": {"type": "linear", "factor": 2.0}}
        )
    with pytest.raises(ConfigError, match="rope_parameters"):
        decoder_config_from_hf({**base, "rope_parameters": {"rope_type": "llama3", "factor": 8.0}})
    with pytest.raises(ConfigError, match="hidden_act"):
        decoder_config_from_hf({**base, "hidden_act": "gelu"})
    with pytest.raises(ConfigError, match="head_dim"):
        decoder_config_from_hf({**base, "head_dim": 32})
    with pytest.raises(ConfigError, match="sliding_window"):
        decoder_config_from_hf({**base, "sliding_window": 4096})
    with pytest.raises(ConfigError, match="layer_types"):
        decoder_config_from_hf({**base, "layer_types": ["sliding_attention", "full_attention"]})
    with pytest.raises(ConfigError, match="model_type"):
        decoder_config_from_hf({**base, "model_type": "mistral"})
    # a legacy config.json: rope_theta at top level, list of eos ids, no pad
    cfg = decoder_config_from_hf(
        {"hidden_size": 64, "num_attention_heads": 4, "rope_theta": 1e6, "eos_token_id": [5, 6]}
    )
    assert (cfg.rope_theta, cfg.eos_token_id, cfg.pad_token_id, cfg.layers) == (1e6, 5, 0, 32)
    with pytest.raises(ConfigError, match="cross_attention_start"):
        decoder_config_to_hf(DecoderConfig(**TINY, cross_attention_start=1))
    with pytest.raises(ConfigError, match="vision_tower"):
        decoder_state_from_hf(
            {"model.embed_tokens.weight": torch.zeros(1), "model.vision_tower.x": torch.zeros(1)}
        )


def test_config_validation():
    with pytest.raises(ConfigError, match="heads"):
        DecoderConfig(width=64, heads=5)
    with pytest.raises(ConfigError, match="kv_heads"):
        DecoderConfig(width=64, heads=4, kv_heads=3)
    with pytest.raises(ConfigError, match="cross_attention_start"):
        DecoderConfig(width=64, heads=4, layers=2, cross_attention_start=3)
    cfg = DecoderConfig(width=64, heads=4)
    assert (cfg.kv_heads, cfg.mlp_hidden, cfg.encoder_width) == (
        4,
        256,
        64,
    )  # Llama's rule: 2/3 * 4 * 64 -> 256


def cross_model(seed: int = 4) -> Decoder:
    torch.manual_seed(seed)
    cfg = DecoderConfig(**TINY, cross_attention_start=1, encoder_width=48)
    model = Decoder(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def encoder_inputs(B: int, seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(B, 7, 48, generator=g)
    emask = torch.ones(B, 7, dtype=torch.long)
    emask[0, 5:] = 0
    return states, emask


def incremental(model, ids, mask=None, prefill: int = 4, **kw):
    """Logits from a prefill of `prefill` tokens then one token at a time through a KVCache: (B, T, V)."""
    B, T = ids.shape
    cache = model.new_cache(B, T + 2)
    out = [
        model(
            ids[:, :prefill], attention_mask=None if mask is None else mask[:, :prefill], cache=cache, **kw
        ).logits
    ]
    for t in range(prefill, T):
        m = None if mask is None else mask[:, : t + 1]
        out.append(model(ids[:, t : t + 1], attention_mask=m, cache=cache, **kw).logits)
        kw = {
            k: v for k, v in kw.items() if k != "encoder_states"
        }  # cross k/v are cached after the first call
    assert cache.length == T
    return torch.cat(out, dim=1)


def test_kv_cache_matches_full_forward():
    torch.manual_seed(6)
    model = Decoder(DecoderConfig(**TINY)).eval()
    ids, mask = left_padded_batch(seed=7, T=10)
    with torch.no_grad():
        torch.testing.assert_close(incremental(model, ids), model(ids).logits, atol=1e-5, rtol=0)
        full = model(ids, attention_mask=mask).logits
        inc = incremental(model, ids, mask, prefill=7)  # row 2's prefill is 6 pads + 1 token
        torch.testing.assert_close(inc[mask.bool()], full[mask.bool()], atol=1e-5, rtol=0)
        # a multi-token chunk after a prefill (past > 0, T > 1) without a mask
        cache = model.new_cache(3, 10)
        a = model(ids[:, :3], cache=cache).logits
        b = model(ids[:, 3:], cache=cache).logits
        torch.testing.assert_close(torch.cat([a, b], 1), model(ids).logits, atol=1e-5, rtol=0)
        with pytest.raises(ValueError, match="max_len"):
            model(ids[:, :1], cache=cache)


def test_kv_cache_with_cross_attention():
    model = cross_model()
    ids, mask = left_padded_batch(seed=8, T=8)
    states, emask = encoder_inputs(3)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, encoder_states=states, encoder_mask=emask)
        inc = incremental(model, ids, mask, prefill=6, encoder_states=states, encoder_mask=emask)
        torch.testing.assert_close(inc[mask.bool()], full.logits[mask.bool()], atol=1e-5, rtol=0)
        # the text-only layers: no encoder needed, equal to forward's unimodal output
        uni = model.forward_unimodal(ids, attention_mask=mask)
        torch.testing.assert_close(uni, full.unimodal, atol=0, rtol=0)
        with pytest.raises(ValueError, match="encoder_states"):
            model(ids)


def test_cache_reorder():
    torch.manual_seed(9)
    model = cross_model(seed=9)
    ids = torch.randint(3, 97, (3, 6), generator=torch.Generator().manual_seed(10))
    states, emask = encoder_inputs(3, seed=11)
    index = torch.tensor([2, 0, 0])
    with torch.no_grad():
        cache = model.new_cache(3, 8)
        model(ids[:, :5], cache=cache, encoder_states=states, encoder_mask=emask)
        cache.reorder(index)
        step = model(ids[index, 5:], cache=cache).logits  # encoder states and mask come from the cache
        ref = model(ids[index], encoder_states=states[index], encoder_mask=emask[index]).logits[:, 5:]
    torch.testing.assert_close(step, ref, atol=1e-5, rtol=0)


def reference_forward(model: Decoder, ids, states, emask):
    """The decoder written out in float64, straight from the equations (no vlmkit code)."""
    cfg = model.cfg
    P = {k: v.double() for k, v in model.state_dict().items()}
    nh, nkv, hs = cfg.heads, cfg.kv_heads, cfg.head_dim
    B, T = ids.shape

    def rms(x, w):
        return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.norm_eps)

    def lin(x, name):
        return x @ P[name + ".weight"].T

    pos = torch.arange(T, dtype=torch.float64)
    inv = torch.tensor([cfg.rope_theta ** (-2 * i / hs) for i in range(hs // 2)], dtype=torch.float64)
    ang = pos[:, None] * inv[None, :]  # (T, hs/2)

    def rope(x):  # rotate channel i with i + hs/2 by angle pos * inv[i]
        a, b = x[..., : hs // 2], x[..., hs // 2 :]
        return torch.cat([a * ang.cos() - b * ang.sin(), b * ang.cos() + a * ang.sin()], -1)

    def attn(q, k, v, allowed):  # q (B, nh, T, hs), k/v (B, nkv, S, hs), allowed (B, 1, T, S)
        k = k.repeat_interleave(nh // nkv, 1)
        v = v.repeat_interleave(nh // nkv, 1)
        s = (q @ k.transpose(-1, -2)) / math.sqrt(hs)
        s = s.masked_fill(~allowed, float("-inf"))
        return (s.softmax(-1) @ v).transpose(1, 2).reshape(B, -1, nh * hs)

    def heads(x, n):
        return x.view(B, x.shape[1], n, hs).transpose(1, 2)

    x = P["embed_tokens.weight"][ids]
    causal = torch.ones(T, T, dtype=torch.bool).tril()[None, None]
    for i in range(cfg.layers):
        p = f"layers.{i}."
        h = rms(x, P[p + "input_layernorm.weight"])
        q = rope(heads(lin(h, p + "self_attn.q_proj"), nh))
        k = rope(heads(lin(h, p + "self_attn.k_proj"), nkv))
        v = heads(lin(h, p + "self_attn.v_proj"), nkv)
        x = x + lin(attn(q, k, v, causal), p + "self_attn.o_proj")
        if i >= cfg.cross_attention_start:
            h = rms(x, P[p + "cross_attn_norm.weight"])
            e = states.double()
            q = heads(lin(h, p + "cross_attn.q_proj"), nh)
            k = heads(lin(e, p + "cross_attn.k_proj"), nkv)
            v = heads(lin(e, p + "cross_attn.v_proj"), nkv)
            x = x + lin(attn(q, k, v, emask.bool()[:, None, None, :]), p + "cross_attn.o_proj")
        h = rms(x, P[p + "post_attention_layernorm.weight"])
        x = x + lin(F.silu(lin(h, p + "mlp.gate_proj")) * lin(h, p + "mlp.up_proj"), p + "mlp.down_proj")
    return lin(rms(x, P["norm.weight"]), "lm_head")


def test_cross_attention_matches_float64_reference():
    model = cross_model(seed=12)
    ids, _ = left_padded_batch(seed=13, T=6)
    states, emask = encoder_inputs(3, seed=14)
    with torch.no_grad():
        ours = model(ids, encoder_states=states, encoder_mask=emask).logits
        ref = reference_forward(model, ids, states, emask)
        torch.testing.assert_close(ours.double(), ref, atol=1e-5, rtol=0)
        # the image matters: other encoder states change the caption logits
        other = model(ids, encoder_states=states.flip(0), encoder_mask=emask).logits
        assert (other - ours).abs().max() > 1e-2


def test_inputs_embeds_and_init():
    torch.manual_seed(15)
    cfg = DecoderConfig(**TINY)
    model = Decoder(cfg).eval()
    ids, mask = left_padded_batch(seed=16)
    with torch.no_grad():
        a = model(ids, attention_mask=mask).logits
        b = model(inputs_embeds=model.embed(ids), attention_mask=mask).logits
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert model.layers[0].mlp.down_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(4), rel=0.15)
    assert model.layers[0].mlp.gate_proj.weight.std().item() == pytest.approx(0.02, rel=0.15)
    out = model(ids, logits="none")
    assert out.logits is None and out.unimodal is None and out.hidden.shape == (3, 9, 64)


@pytest.mark.parametrize("padding", ["little", "packed"])
def test_bf16_autocast_training_matches_float64(padding):
    """Training under bf16 autocast (explicit-matmul attention with shared kv heads, rotary in bf16, a
    right-padded batch, masked or packed): the loss and every gradient stay close to the float64 model's."""
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(**TINY, max_seq_len=64))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.15 * torch.randn_like(p))
    ids = torch.randint(1, 97, (3, 12))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 8:] = 0  # right padding, as training batches are
    if padding == "packed":
        mask[2, 5:] = 0
    assert (right_padded_packing(mask) is not None) == (padding == "packed")
    targets = torch.randint(1, 97, (3, 12))

    def loss_and_grads(m, autocast: bool):
        m.zero_grad()
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            logits = m(ids, attention_mask=mask).logits
        loss = F.cross_entropy(logits.double().flatten(0, 1), targets.flatten(), reduction="none")
        loss = (loss * mask.flatten()).sum() / mask.sum()
        loss.backward()
        return loss.item(), {n: p.grad.double() for n, p in m.named_parameters()}

    want_loss, want = loss_and_grads(model.double(), autocast=False)
    got_loss, got = loss_and_grads(model.float(), autocast=True)
    assert got_loss == pytest.approx(want_loss, rel=2e-2)
    errors = {n: ((got[n] - want[n]).norm() / want[n].norm()).item() for n in want}  # relative, per tensor
    assert max(errors.values()) < 0.03, errors


@pytest.mark.parametrize("cross", [False, True])
def test_right_padded_batch_is_packed_and_equals_each_row_alone(cross):
    """A right-padded batch runs packed (no padding computed): each row's logits and the gradients equal
    the rows run alone without padding, in float64, with and without cross-attention layers."""
    torch.manual_seed(0)
    cfg = DecoderConfig(**TINY, max_seq_len=64, cross_attention_start=1 if cross else None, encoder_width=48)
    model = Decoder(cfg).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.15 * torch.randn_like(p))
    lengths = [10, 4, 6]
    ids = torch.randint(1, 97, (3, 10))
    mask = (torch.arange(10)[None, :] < torch.tensor(lengths)[:, None]).long()
    ids[mask == 0] = 0
    enc = torch.randn(3, 5, 48, dtype=torch.float64) if cross else None
    weights = torch.randn(3, 10, 97, dtype=torch.float64)
    assert right_padded_packing(mask) is not None
    assert right_padded_packing(mask.flip(1)) is None  # left padding is never packed

    model.zero_grad()
    out = model(ids, attention_mask=mask, encoder_states=enc)
    loss = sum((out.logits[b, :n] * weights[b, :n]).sum() for b, n in enumerate(lengths))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert (out.hidden[1, 4:] == 0).all()  # nothing computed at the padding

    model.zero_grad()
    ref_loss = 0
    for b, n in enumerate(lengths):
        alone = model(ids[b : b + 1, :n], encoder_states=enc[b : b + 1] if cross else None)
        torch.testing.assert_close(out.logits[b, :n], alone.logits[0])
        if cross:
            torch.testing.assert_close(out.unimodal[b, :n], alone.unimodal[0])
        ref_loss = ref_loss + (alone.logits[0] * weights[b, :n]).sum()
    ref_loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, msg=n)

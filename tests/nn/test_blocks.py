"""The shared blocks against float64 re-computations written out by hand from their definitions."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from vlmkit.errors import ConfigError
from vlmkit.nn.attention import Attention, attention
from vlmkit.nn.mlp import MLP, get_activation
from vlmkit.nn.packing import Packing
from vlmkit.nn.patch import PatchEmbed, resample_pos_embed
from vlmkit.nn.pool import AttentionPool
from vlmkit.nn.transformer import Block, Transformer, padding_mask

B, T, C, NH = 3, 7, 16, 4
HS = C // NH


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=seeded(seed), dtype=dtype)


def randomise(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """float64 and random everything (biases and norm gains too), so no term of the reference is a no-op."""
    module = module.double()
    g = seeded(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)
    return module


# ---- float64 references ----------------------------------------------------------------------------


def ref_linear(x, lin):
    y = x @ lin.weight.T
    return y + lin.bias if lin.bias is not None else y


def ref_layer_norm(x, ln):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)  # biased, as LayerNorm defines it
    return (x - mean) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def ref_activation(name, x):
    if name == "gelu":
        return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))
    if name == "gelu_tanh":
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    return x / (1 + torch.exp(-1.702 * x))  # quick_gelu: x * sigmoid(1.702 x)


def ref_mlp(x, mlp):
    return ref_linear(ref_activation(mlp.act_name, ref_linear(x, mlp.fc1)), mlp.fc2)


def ref_heads_attention(q, k, v, allowed):
    """Per-head softmax(q k^T / sqrt(hs)) v with explicit loops; `allowed[b, i, j]` says query i sees key j."""
    Bq, Tq, Cq = q.shape
    hs = Cq // NH
    out = torch.zeros(Bq, Tq, Cq, dtype=q.dtype)
    for b in range(Bq):
        for h in range(NH):
            sl = slice(h * hs, (h + 1) * hs)
            scores = q[b, :, sl] @ k[b, :, sl].T / math.sqrt(hs)  # (T, S)
            scores = scores.masked_fill(~allowed[b], float("-inf"))
            w = torch.exp(scores - scores.max(-1, keepdim=True).values)
            out[b, :, sl] = (w / w.sum(-1, keepdim=True)) @ v[b, :, sl]
    return out


def ref_attention(x, attn, allowed):
    qkv = ref_linear(x, attn.qkv)
    q, k, v = qkv[..., :C], qkv[..., C : 2 * C], qkv[..., 2 * C :]
    return ref_linear(ref_heads_attention(q, k, v, allowed), attn.proj)


def ref_allowed(key_mask: torch.Tensor | None, causal: bool, Tq: int = T) -> torch.Tensor:
    """Boolean (B, T, T) from first principles: key j visible if not padded and (j <= i if causal); i sees i."""
    allowed = torch.zeros(B, Tq, Tq, dtype=torch.bool)
    for b in range(B):
        for i in range(Tq):
            for j in range(Tq):
                ok = (key_mask is None or bool(key_mask[b, j])) and (not causal or j <= i)
                allowed[b, i, j] = ok or i == j
    return allowed


KEY_MASK = torch.tensor([[1] * T, [1] * 5 + [0] * 2, [1] * 3 + [0] * 4])  # right-padded captions


# ---- Attention -------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
def test_attention_matches_float64_reference(causal):
    attn = randomise(Attention(C, NH))
    x = randn(B, T, C, seed=1)
    out = attn(x, is_causal=causal)
    torch.testing.assert_close(out, ref_attention(x, attn, ref_allowed(None, causal)))


@pytest.mark.parametrize("causal", [False, True])
def test_attention_with_padding_mask_matches_float64_reference(causal):
    attn = randomise(Attention(C, NH))
    x = randn(B, T, C, seed=1)
    out = attn(x, attn_mask=padding_mask(KEY_MASK, causal))
    torch.testing.assert_close(out, ref_attention(x, attn, ref_allowed(KEY_MASK, causal)))


def test_padding_mask_is_the_rule_it_states():
    for causal in (False, True):
        mask = padding_mask(KEY_MASK, causal)
        assert mask.shape == (B, 1, T, T) and mask.dtype == torch.bool
        assert torch.equal(mask[:, 0], ref_allowed(KEY_MASK, causal))


def test_padded_keys_do_not_change_real_tokens():
    """Causal attention over a padded caption equals attention over the caption alone."""
    attn = randomise(Attention(C, NH))
    x = randn(1, T, C, seed=2)
    n = 4
    padded = attn(x, attn_mask=padding_mask(torch.tensor([[1] * n + [0] * (T - n)]), causal=True))
    alone = attn(x[:, :n], is_causal=True)
    torch.testing.assert_close(padded[:, :n], alone)
    # Bidirectional too: real tokens ignore whatever sits in the padded slots.
    x2 = x.clone()
    x2[:, n:] = randn(1, T - n, C, seed=3)
    mask = padding_mask(torch.tensor([[1] * n + [0] * (T - n)]), causal=False)
    torch.testing.assert_close(attn(x, attn_mask=mask)[:, :n], attn(x2, attn_mask=mask)[:, :n])


@pytest.mark.parametrize("mask", ["none", "causal", "padding"])
def test_low_precision_training_path_matches_float64(mask):
    """bf16 with gradients on CPU takes the explicit matmul + softmax path: values and gradients still agree."""
    q64, k64, v64 = (randn(B, NH, T, HS, seed=s) for s in (4, 5, 6))
    is_causal = mask == "causal"
    attn_mask = padding_mask(KEY_MASK, causal=False) if mask == "padding" else None
    allowed = ref_allowed(KEY_MASK if mask == "padding" else None, is_causal)  # (B, T, T)
    go = randn(B, NH, T, HS, seed=7)

    q, k, v = (t.bfloat16().requires_grad_() for t in (q64, k64, v64))
    out = attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
    out.backward(go.bfloat16())

    q64, k64, v64 = (t.clone().requires_grad_() for t in (q64, k64, v64))
    flat = lambda t: t.transpose(1, 2).reshape(B, T, C)  # (B, nh, T, hs) -> (B, T, C), heads side by side
    ref = ref_heads_attention(flat(q64), flat(k64), flat(v64), allowed).view(B, T, NH, HS).transpose(1, 2)
    ref.backward(go)

    assert out.dtype == torch.bfloat16
    tol = dict(atol=3e-2, rtol=3e-2)  # bf16 has 8 bits of mantissa
    torch.testing.assert_close(out.double(), ref.detach(), **tol)
    for got, want in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        torch.testing.assert_close(got.double(), want, **tol)


def test_low_precision_path_agrees_with_sdpa():
    q, k, v = (randn(B, NH, T, HS, seed=s).bfloat16() for s in (4, 5, 6))
    for is_causal in (False, True):
        with torch.no_grad():  # no gradients: this is F.scaled_dot_product_attention itself
            sdpa = attention(q, k, v, is_causal=is_causal)
        explicit = attention(q.requires_grad_(), k, v, is_causal=is_causal).detach()
        q.requires_grad_(False)
        torch.testing.assert_close(explicit.float(), sdpa.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("is_causal", [False, True])
def test_low_precision_path_shares_key_value_heads(is_causal):
    """enable_gqa on the explicit path: each kv head serves NH // 2 query heads, values and gradients."""
    q64 = randn(B, NH, T, HS, seed=4)
    k64, v64 = randn(B, 2, T, HS, seed=5), randn(B, 2, T, HS, seed=6)
    go = randn(B, NH, T, HS, seed=7)
    q, k, v = (t.bfloat16().requires_grad_() for t in (q64, k64, v64))
    out = attention(q, k, v, is_causal=is_causal, enable_gqa=True)
    out.backward(go.bfloat16())
    q64, k64, v64 = (t.clone().requires_grad_() for t in (q64, k64, v64))
    rep = lambda t: t.repeat_interleave(NH // 2, dim=1)  # kv head j serves query heads j*NH/2 ...
    ref = F.scaled_dot_product_attention(q64, rep(k64), rep(v64), is_causal=is_causal)
    ref.backward(go)
    tol = dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(out.double(), ref.detach(), **tol)
    assert k.grad.shape == (B, 2, T, HS)
    for got, want in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        torch.testing.assert_close(got.double(), want, **tol)


def test_attention_rejects_width_not_divisible_by_heads():
    with pytest.raises(AssertionError, match="not divisible"):
        Attention(10, 3)


# ---- MLP, Block, Transformer -----------------------------------------------------------------------


@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "quick_gelu"])
def test_mlp_matches_float64_reference(act):
    mlp = randomise(MLP(C, 3 * C, act))
    x = randn(B, T, C, seed=1) * 2  # reach the tails where the three activations differ
    torch.testing.assert_close(mlp(x), ref_mlp(x, mlp))


def test_mlp_out_dim_and_activations_differ():
    assert randomise(MLP(C, 2 * C, out_dim=5))(randn(2, C)).shape == (2, 5)
    x = torch.linspace(-3, 3, 13, dtype=torch.float64)
    outs = [get_activation(a)(x) for a in ("gelu", "gelu_tanh", "quick_gelu")]
    assert not torch.allclose(outs[0], outs[2], atol=1e-3) and not torch.allclose(outs[0], outs[1], atol=1e-6)


def test_unknown_activation_is_a_config_error():
    with pytest.raises(ConfigError, match="relu6"):
        MLP(C, 2 * C, "relu6")


@pytest.mark.parametrize("causal", [False, True])
def test_block_is_pre_norm_residual(causal):
    block = randomise(Block(C, NH, mlp_ratio=2.0, act="quick_gelu"))
    x = randn(B, T, C, seed=1)
    h = x + ref_attention(ref_layer_norm(x, block.ln_1), block.attn, ref_allowed(None, causal))
    want = h + ref_mlp(ref_layer_norm(h, block.ln_2), block.mlp)
    torch.testing.assert_close(block(x, is_causal=causal), want)


def ref_cross(x, context, cross):
    """Cross-attention from x to every context token, with its own q/k/v/o projections."""
    q, k, v = (
        ref_linear(x, cross.q_proj),
        ref_linear(context, cross.k_proj),
        ref_linear(context, cross.v_proj),
    )
    allowed = torch.ones(x.shape[0], x.shape[1], context.shape[1], dtype=torch.bool)
    return ref_linear(ref_heads_attention(q, k, v, allowed), cross.o_proj)


@pytest.mark.parametrize("post_norm", [False, True])
def test_fusion_block_options_match_float64_reference(post_norm):
    """Post-norm (BERT) or pre-norm, with cross-attention to image tokens of another width, and the decoder's
    own causal self-attention."""
    N, CV = 5, 12
    block = randomise(Block(C, NH, 2.0, "gelu", post_norm=post_norm, cross_dim=CV, causal_attn=True))
    x, image = randn(B, T, C, seed=1), randn(B, N, CV, seed=2)
    mask = padding_mask(KEY_MASK, False)
    for decoder in (False, True):
        ln, attn = (block.ln_causal, block.attn_causal) if decoder else (block.ln_1, block.attn)
        allowed = ref_allowed(KEY_MASK, causal=decoder)
        if post_norm:
            h = ref_layer_norm(x + ref_attention(x, attn, allowed), ln)
            h = ref_layer_norm(h + ref_cross(h, image, block.cross_attn), block.ln_cross)
            want = ref_layer_norm(h + ref_mlp(h, block.mlp), block.ln_2)
        else:
            h = x + ref_attention(ref_layer_norm(x, ln), attn, allowed)
            h = h + ref_cross(ref_layer_norm(h, block.ln_cross), image, block.cross_attn)
            want = h + ref_mlp(ref_layer_norm(h, block.ln_2), block.mlp)
        got = block(x, attn_mask=padding_mask(KEY_MASK, decoder), context=image, decoder=decoder)
        torch.testing.assert_close(got, want)
    # without context the cross-attention is skipped (the text-only pass of a BLIP layer)
    if not post_norm:
        h = x + ref_attention(ref_layer_norm(x, block.ln_1), block.attn, ref_allowed(KEY_MASK, False))
        torch.testing.assert_close(
            block(x, attn_mask=mask), h + ref_mlp(ref_layer_norm(h, block.ln_2), block.mlp)
        )
    with pytest.raises(ValueError, match="causal_attn=True"):
        Block(C, NH).double()(x, decoder=True)


@pytest.mark.parametrize("masking", ["causal", "padding"])
def test_grad_checkpointing_changes_nothing(masking):
    x = randn(B, T, C, seed=1)
    kwargs = dict(is_causal=True) if masking == "causal" else dict(attn_mask=padding_mask(KEY_MASK, False))
    outs, grads = [], []
    for checkpointing in (False, True):
        model = randomise(Transformer(C, layers=3, heads=NH, mlp_ratio=2.0)).train()
        model.grad_checkpointing = checkpointing
        xi = x.clone().requires_grad_()
        out = model(xi, **kwargs)
        out.pow(2).sum().backward()
        outs.append(out.detach())
        grads.append([xi.grad] + [p.grad for p in model.parameters()])
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


INDEX = torch.tensor([0, 4, 2])  # one read-out token per row (the 2 of row 3 is its last real token)


@pytest.mark.parametrize("mask", ["none", "causal", "padding"])
def test_block_forward_one_is_the_full_block_at_one_token(mask):
    """The pooled-token fast path of the last block: the float64 reference at `index`, values and gradients."""
    block = randomise(Block(C, NH, mlp_ratio=2.0, act="quick_gelu"))
    is_causal = mask == "causal"
    key_mask = KEY_MASK if mask == "padding" else None
    kwargs = dict(attn_mask=padding_mask(KEY_MASK, causal=False)) if key_mask is not None else {}
    rows = torch.arange(B)

    x = randn(B, T, C, seed=1).requires_grad_()
    out = block.forward_one(x, INDEX, is_causal=is_causal, **kwargs)  # (B, C)
    out.pow(2).sum().backward()
    got = [x.grad] + [p.grad for p in block.parameters()]
    block.zero_grad()

    x_ref = x.detach().clone().requires_grad_()
    h = x_ref + ref_attention(ref_layer_norm(x_ref, block.ln_1), block.attn, ref_allowed(key_mask, is_causal))
    ref = (h + ref_mlp(ref_layer_norm(h, block.ln_2), block.mlp))[rows, INDEX]
    ref.pow(2).sum().backward()
    want = [x_ref.grad] + [p.grad for p in block.parameters()]

    assert out.shape == (B, C)
    torch.testing.assert_close(out, ref.detach())
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def test_block_forward_one_bf16_training_matches_float64():
    block = randomise(Block(C, NH, mlp_ratio=2.0))
    x = randn(B, T, C, seed=1)
    want = block(x, is_causal=True)[torch.arange(B), INDEX]
    block32 = copy.deepcopy(block).float()  # autocast leaves float64 alone
    with torch.autocast("cpu", torch.bfloat16):
        got = block32.forward_one(x.float().requires_grad_(), INDEX, is_causal=True)  # explicit attention
    got.float().sum().backward()  # and the bf16 path trains
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in block32.parameters())
    torch.testing.assert_close(got.double(), want, atol=0.15, rtol=5e-2)


@pytest.mark.parametrize("layers", [0, 1, 3])
def test_transformer_with_index_returns_the_full_output_at_index(layers):
    model = randomise(Transformer(C, layers=layers, heads=NH, mlp_ratio=2.0))
    x = randn(B, T, C, seed=1)
    full = model(x, is_causal=True)[torch.arange(B), INDEX]
    torch.testing.assert_close(model(x, is_causal=True, index=INDEX), full)


def test_packing_round_trip_and_last_tokens():
    lengths = torch.tensor([3, 7, 1])
    packing = Packing(lengths, T)
    x = randn(B, T, C, seed=1)
    packed = packing.pack(x)
    assert packed.shape == (11, C)
    torch.testing.assert_close(packed[:3], x[0, :3])
    torch.testing.assert_close(packed[3:10], x[1])
    torch.testing.assert_close(packed[10], x[2, 0])
    torch.testing.assert_close(packed[packing.last], x[torch.arange(B), lengths - 1])
    unpacked = packing.unpack(packed)
    keep = torch.arange(T)[None, :] < lengths[:, None]
    torch.testing.assert_close(unpacked[keep], x[keep])
    assert (unpacked[~keep] == 0).all()
    # worth packing only when it removes enough padding
    assert Packing.maybe(lengths, T) is not None
    assert Packing.maybe(torch.tensor([7, 7, 6]), T) is None


@pytest.mark.parametrize("layers", [1, 3])
@pytest.mark.parametrize("read_out", ["all", "index"])
def test_packed_causal_transformer_equals_padded_rows(layers, read_out):
    """Packed rows through the stack: the padded batch's values and gradients at every real token."""
    lengths = torch.tensor([3, 7, 1])
    index = lengths - 1  # read out at each row's last real token, as a causal text tower does
    keep = torch.arange(T)[None, :] < lengths[:, None]  # (B, T)
    model = randomise(Transformer(C, layers=layers, heads=NH, mlp_ratio=2.0, act="quick_gelu"))
    x = randn(B, T, C, seed=1)
    weights = randn(B, T, C, seed=2)  # a loss that weighs every output differently

    results = []
    for packed in (False, True):
        model.zero_grad()
        xi = x.clone().requires_grad_()
        idx = index if read_out == "index" else None
        if packed:
            packing = Packing(lengths, T)
            out = model(packing.pack(xi), is_causal=True, index=idx, packing=packing)
            if idx is None:
                out = packing.unpack(out)[keep]  # (N, C) in row order
        else:
            out = model(xi, is_causal=True, index=idx)
            if idx is None:
                out = out[keep]
        w = weights[torch.arange(B), index] if idx is not None else weights[keep]
        (out * w).sum().backward()
        results.append((out.detach(), xi.grad, [p.grad.clone() for p in model.parameters()]))
    (out_pad, gx_pad, gp_pad), (out_pack, gx_pack, gp_pack) = results
    torch.testing.assert_close(out_pack, out_pad)
    torch.testing.assert_close(gx_pack, gx_pad)
    assert (gx_pack[~keep] == 0).all()  # the padding is never computed
    for a, b in zip(gp_pack, gp_pad, strict=True):
        torch.testing.assert_close(a, b)


def test_packed_transformer_with_grad_checkpointing_and_bf16_training():
    lengths = torch.tensor([3, 7, 1])
    model = randomise(Transformer(C, layers=2, heads=NH, mlp_ratio=2.0))
    x = randn(B, T, C, seed=1)
    want = model(x, is_causal=True, index=lengths - 1)
    model32 = copy.deepcopy(model).float().train()
    model32.grad_checkpointing = True
    packing = Packing(lengths, T)
    with torch.autocast("cpu", torch.bfloat16):  # the explicit-matmul attention of bf16 training
        got = model32(
            packing.pack(x.float()).requires_grad_(), is_causal=True, index=lengths - 1, packing=packing
        )
    got.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model32.parameters())
    torch.testing.assert_close(got.double(), want, atol=0.15, rtol=5e-2)


def test_transformer_stacks_its_blocks_in_order():
    model = randomise(Transformer(C, layers=2, heads=NH))
    x = randn(B, T, C, seed=1)
    torch.testing.assert_close(
        model(x, is_causal=True), model.blocks[1](model.blocks[0](x, is_causal=True), is_causal=True)
    )
    assert not torch.allclose(model(x, is_causal=True), model(x))


# ---- patches, position tables, attention pooling -----------------------------------------------------


@pytest.mark.parametrize("bias", [False, True])
def test_patch_embed_is_unfold_then_matmul(bias):
    p, width = 4, 8
    embed = randomise(PatchEmbed(p, width, bias=bias))
    images = randn(2, 3, 12, 8, seed=1)  # a 3 x 2 patch grid, not square on purpose
    rows = []
    for i in range(12 // p):  # patches in row-major order, each flattened as (channel, y, x)
        for j in range(8 // p):
            rows.append(images[:, :, i * p : (i + 1) * p, j * p : (j + 1) * p].reshape(2, -1))
    patches = torch.stack(rows, dim=1)  # (B, N, 3 p p)
    want = patches @ embed.proj.weight.reshape(width, -1).T
    if bias:
        want = want + embed.proj.bias
    got = embed(images)
    assert got.shape == (2, 6, width)
    torch.testing.assert_close(got, want)


def test_resample_pos_embed():
    table = randn(1 + 4 * 4, C, seed=1)
    assert resample_pos_embed(table, (4, 4)) is table  # same grid: untouched
    for grid in [(6, 6), (3, 5)]:
        out = resample_pos_embed(table, grid)
        assert out.shape == (1 + grid[0] * grid[1], C) and out.dtype == table.dtype
        torch.testing.assert_close(out[:1], table[:1], rtol=0, atol=0)  # the class-token row is kept
    # Interpolation weights sum to one, so a constant table stays that constant; no prefix works too.
    const = torch.full((5 * 5, C), 0.3, dtype=torch.float64)
    torch.testing.assert_close(
        resample_pos_embed(const, (7, 3), num_prefix_tokens=0), torch.full((21, C), 0.3, dtype=torch.float64)
    )
    # Up then back down to the same grid comes back close for a smooth table.
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 8), torch.linspace(0, 1, 8), indexing="ij")
    smooth = torch.stack([torch.sin(yy + c) * torch.cos(xx) for c in range(C)], -1).reshape(64, C).double()
    back = resample_pos_embed(resample_pos_embed(smooth, (16, 16), 0), (8, 8), 0)
    torch.testing.assert_close(back, smooth, atol=0.02, rtol=0)


def test_attention_pool_matches_float64_reference():
    pool = randomise(AttentionPool(C, NH, mlp_ratio=2.0, act="gelu_tanh"))
    x = randn(B, T, C, seed=1)
    q = ref_linear(pool.query, pool.q).expand(B, 1, C)  # (B, 1, C): one learned query per image
    kv = ref_linear(x, pool.kv)
    k, v = kv[..., :C], kv[..., C:]
    y = ref_linear(
        ref_heads_attention(q, k, v, torch.ones(B, 1, T, dtype=torch.bool)), pool.proj
    )  # (B, 1, C)
    want = y + ref_mlp(ref_layer_norm(y, pool.norm), pool.mlp)
    got = pool(x)
    assert got.shape == (B, 1, C)
    torch.testing.assert_close(got, want)


def test_attention_pool_loads_the_older_siglip_probe():
    """Folders saved before the two pools became one hold SigLIP's query as `probe`, shaped (1, 1, C)."""
    pool = randomise(AttentionPool(C, NH, mlp_ratio=2.0))
    state = {k: v.clone() for k, v in pool.state_dict().items()}
    state["probe"] = state.pop("query")
    fresh = AttentionPool(C, NH, mlp_ratio=2.0).double()
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.query, pool.query)
    # CoCa's pooler kept its queries 2-D, (num_queries, dim)
    coca = randomise(AttentionPool(C, NH, num_queries=3, norm_inputs=True, norm_output=True))
    state = {k: v.clone() for k, v in coca.state_dict().items()}
    state["query"] = state["query"][0]
    fresh = AttentionPool(C, NH, num_queries=3, norm_inputs=True, norm_output=True).double()
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.query, coca.query)


def test_attention_pool_bf16_training_matches_float64_reference():
    """Under bf16 autocast with gradients the pool takes the explicit attention path (a broadcast query)."""
    pool = randomise(AttentionPool(C, NH, mlp_ratio=2.0, act="gelu_tanh"))
    x = randn(B, T, C, seed=1)
    want = pool(x).detach()
    pool32 = pool.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = pool32(x.float())
    got.float().sum().backward()
    assert pool32.query.grad is not None and pool32.query.grad.abs().sum() > 0
    torch.testing.assert_close(got.double(), want, atol=0.1, rtol=0.05)


def test_long_sequences_keep_the_fused_kernel():
    """Past the length where the explicit path stops paying, bf16 training attention is SDPA bit for bit."""
    from vlmkit.nn.attention import EXPLICIT_ATTENTION_MAX_LEN

    q, k, v = (randn(1, 2, EXPLICIT_ATTENTION_MAX_LEN + 1, 8, seed=s).bfloat16() for s in (1, 2, 3))
    q.requires_grad_()
    out = attention(q, k, v, is_causal=True)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_conv_stem_matches_a_functional_float64_recomputation():
    from vlmkit.nn.patch import ConvStem

    torch.manual_seed(0)
    stem = ConvStem(patch_size=8, width=32).double()
    for m in stem.modules():  # non-trivial norm affine parameters, so they are checked too
        if isinstance(m, torch.nn.GroupNorm):
            torch.nn.init.normal_(m.weight)
            torch.nn.init.normal_(m.bias)
    x = torch.randn(2, 3, 32, 48, dtype=torch.float64)
    h = x
    convs = [m for m in stem.proj if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in stem.proj if isinstance(m, torch.nn.GroupNorm)]
    for conv, norm in zip(convs[:-1], norms):
        h = F.conv2d(h, conv.weight, stride=2, padding=1)
        mean = h.mean(dim=(1, 2, 3), keepdim=True)
        var = h.var(dim=(1, 2, 3), unbiased=False, keepdim=True)
        h = (h - mean) / torch.sqrt(var + norm.eps) * norm.weight[:, None, None] + norm.bias[:, None, None]
        h = 0.5 * h * (1 + torch.erf(h / 2**0.5))
    h = F.conv2d(h, convs[-1].weight, convs[-1].bias)  # (B, width, 4, 6)
    expected = h.flatten(2).transpose(1, 2)  # (B, 24, width), row-major like PatchEmbed
    out = stem(x)
    assert out.shape == (2, 4 * 6, 32)
    torch.testing.assert_close(out, expected)


def test_conv_stem_in_a_vit_and_its_config_check():
    from vlmkit.models import create_model

    model = create_model("clip-tiny", **{"vision.stem": "conv", "text.vocab_size": 50, "vision.layers": 1})
    model.encode_image(torch.randn(2, 3, 64, 64)).sum().backward()
    assert all(p.grad is not None for p in model.visual.patch_embed.parameters())
    with pytest.raises(ConfigError, match="power-of-two"):
        create_model(
            "clip-tiny",
            **{"vision.stem": "conv", "vision.patch_size": 6, "vision.image_size": 48, "text.vocab_size": 50},
        )

"""Flow matching: the loss is zero for the exact velocity of a point mass, Euler sampling carries a Gaussian to
the Gaussian the analytic velocity says, guidance is its formula, the UNet reads its condition, and the moving
average of the weights is its formula."""

from __future__ import annotations

import pytest
import torch

from vlmkit.errors import ConfigError
from vlmkit.models.flow import FlowConfig, build_flow_model, euler_sample, flow_loss, guided
from vlmkit.models.text import TextConfig


def test_the_exact_velocity_of_a_point_mass_has_zero_loss_and_lands_on_it():
    target = torch.randn(1, 3, 4, 4)
    exact = lambda x, t: (target - x) / (1 - t.view(-1, 1, 1, 1))  # noqa: E731  the straight line's velocity
    x1 = target.expand(8, -1, -1, -1)
    assert flow_loss(exact, x1, torch.Generator().manual_seed(0)).item() < 1e-10
    landed = euler_sample(exact, torch.randn(8, 3, 4, 4), steps=5)
    torch.testing.assert_close(landed, x1, atol=1e-5, rtol=0)


def test_euler_sampling_carries_noise_to_the_analytic_gaussian():
    # x1 ~ N(m, s^2) independent of x0 ~ N(0, 1): E[x1 - x0 | x_t = x] is linear in x
    m, s = 2.0, 0.5
    torch.manual_seed(0)

    def velocity(x, t):
        t = t.view(-1, 1).double()
        var = (1 - t) ** 2 + t**2 * s**2
        return m + (t * s**2 - (1 - t)) / var * (x - t * m)

    x = euler_sample(velocity, torch.randn(20000, 1, dtype=torch.float64), steps=200)
    assert abs(x.mean().item() - m) < 0.02 and abs(x.std().item() - s) < 0.02


@pytest.mark.parametrize("arch", ["unet", "dit"])
def test_guidance_is_its_formula_and_the_condition_matters(arch):
    torch.manual_seed(0)
    cfg = FlowConfig(
        image_size=16, channels=(8, 16), cond_dim=12, embed_dim=16, arch=arch, patch=4, width=32, heads=2
    )
    model = build_flow_model(cfg)
    for p in model.parameters():  # the zero-initialised output layers would hide everything
        torch.nn.init.normal_(p, std=0.2)
    x, t, cond = torch.randn(2, 3, 16, 16), torch.tensor([0.3, 0.7]), torch.randn(2, 12)
    vc, vu = model(x, t, cond), model(x, t, None)
    assert vc.shape == x.shape and not torch.allclose(vc, vu)
    torch.testing.assert_close(guided(model, cond, 3.0)(x, t), vu + 3.0 * (vc - vu), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(guided(model, cond, 1.0)(x, t), vc)
    dropped = model.drop_condition(torch.randn(4000, 12), torch.Generator().manual_seed(0))
    share = (dropped == model.null_cond).all(dim=1).float().mean().item()
    assert 0.08 < share < 0.12


def test_the_dit_puts_each_patch_back_where_it_came_from():
    cfg = FlowConfig(image_size=8, arch="dit", patch=2, width=16, heads=2, layers=1, cond_dim=4, embed_dim=8)
    model = build_flow_model(cfg)
    g, p = 4, 2
    code = torch.tensor([[tok * 1000 + py * 100 + px * 10 + c for py in range(p) for px in range(p) for c in range(3)]
                         for tok in range(g * g)], dtype=torch.float32)  # (tokens, p*p*3)  # fmt: skip
    model.head = torch.nn.Module()
    model.head.forward = lambda h: code.expand(h.shape[0], -1, -1)
    out = model(torch.zeros(2, 3, 8, 8), torch.zeros(2), None)
    for c, y, x in ((0, 0, 0), (2, 1, 0), (1, 3, 6), (0, 7, 7)):
        expected = ((y // p) * g + x // p) * 1000 + (y % p) * 100 + (x % p) * 10 + c
        assert out[1, c, y, x].item() == expected


def test_bad_settings_are_one_line():
    with pytest.raises(ConfigError, match="multiples of 8"):
        FlowConfig(channels=(12,))
    with pytest.raises(ConfigError, match="arch must be"):
        FlowConfig(arch="vae")
    with pytest.raises(ConfigError, match="multiple of patch"):
        FlowConfig(image_size=30, arch="dit", patch=4)
    with pytest.raises(ConfigError, match="at least 1"):
        euler_sample(lambda x, t: x, torch.zeros(1), steps=0)


def test_the_moving_average_is_its_formula_and_sampling_uses_it():
    from vlmkit.models.flow import FlowModel, FlowModelConfig

    torch.manual_seed(0)
    cfg = FlowModelConfig(net=FlowConfig(image_size=8, channels=(8, 16), embed_dim=16),
                          text=TextConfig(vocab_size=20, context_length=6, width=16, layers=1, heads=2),
                          embed_dim=8, ema_decay=0.9)  # fmt: skip
    model = FlowModel(cfg)
    assert model.sampling_net() is model.net  # never averaged yet: the trained weights
    assert not any(p.requires_grad for p in model.ema.parameters())
    model.update_ema()  # the first update copies
    w0 = {k: v.double().clone() for k, v in model.net.state_dict().items()}
    with torch.no_grad():
        for p in model.net.parameters():
            p.add_(torch.randn_like(p))
    model.update_ema()
    w1 = model.net.state_dict()
    for k, v in model.ema.module.state_dict().items():
        assert torch.allclose(v.double(), 0.9 * w0[k] + 0.1 * w1[k].double(), atol=1e-6), k
    assert model.sampling_net() is model.ema.module
    ids = torch.randint(3, 20, (2, 6))
    g = torch.Generator().manual_seed(0)
    averaged = model.sample(ids, steps=2, generator=g)
    trained = model.sample(ids, steps=2, generator=torch.Generator().manual_seed(0), use_ema=False)
    assert averaged.shape == (2, 3, 8, 8) and not torch.allclose(averaged, trained)


def test_cross_attention_reads_the_unmasked_caption_tokens_only():
    torch.manual_seed(0)
    net = build_flow_model(
        FlowConfig(image_size=8, channels=(8, 16), embed_dim=16, cond_dim=4, context_dim=6, heads=2)
    )
    for m in net.cross:  # out-projections start at zero: give them weights so the context shows
        torch.nn.init.normal_(m.out.weight, std=0.5)
    x, t, c = torch.randn(2, 3, 8, 8), torch.rand(2), torch.randn(2, 4)
    ctx, mask = torch.randn(2, 5, 6), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    base = net(x, t, c, ctx, mask)
    changed = ctx.clone()
    changed[0, 4] += 5.0  # a masked token of row 0
    assert torch.allclose(net(x, t, c, changed, mask), base, atol=1e-6)
    changed[0, 1] += 5.0  # a read one
    assert not torch.allclose(net(x, t, c, changed, mask)[0], base[0], atol=1e-4)
    assert torch.allclose(net(x, t, c, changed, mask)[1], base[1], atol=1e-6)  # rows stay apart
    # no token readable is the null caption, which is what no context at all means
    none = torch.zeros_like(mask)
    assert torch.allclose(net(x, t, c, ctx, none), net(x, t, c), atol=1e-6)
    # guidance with tokens: the unconditional half reads none of them
    v = guided(net, c, 2.0, ctx, mask)(x, t)
    vc, vu = net(x, t, c, ctx, mask), net(x, t, net.null_cond.expand_as(c))
    assert torch.allclose(v, vu + 2.0 * (vc - vu), atol=1e-5)


def test_the_registry_sizes_build():
    from vlmkit.models.registry import create_model

    with torch.device("meta"):  # shapes only
        big = create_model("flow-B")
    assert big.cfg.image_size == 128 and big.cfg.net.context_dim == 512 and big.cfg.embed_dim == 512
    assert not create_model("flow-tiny").cfg.net.context_dim  # off at the CPU size (see the registry)
    tiny = create_model("flow-tiny", cross_attention=True)
    trained = sum(p.numel() for p in tiny.net.parameters())
    assert sum(p.numel() for p in tiny.ema.parameters()) == trained  # the average is one copy of the network
    v = tiny.net(torch.randn(2, 3, 32, 32), torch.rand(2), torch.randn(2, 128), torch.randn(2, 5, 128),
                 torch.ones(2, 5, dtype=torch.bool))  # fmt: skip
    assert v.shape == (2, 3, 32, 32)

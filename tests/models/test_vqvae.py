"""The VQ-VAE image tokenizer: straight-through gradients, the codebook's EMA by hand in float64, dead codes
restarted on encoder outputs, the tokenize-detokenize round trip, and a tiny one learning rendered scenes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlmkit.data.synthetic import render_scene
from vlmkit.errors import ConfigError
from vlmkit.models.vqvae import VQVAE, Quantizer, VQVAEConfig


def test_straight_through_passes_the_gradient_unchanged():
    torch.manual_seed(0)
    quant = Quantizer(16, 4, decay=0.99, restart_threshold=0.0).eval()  # eval: no codebook update
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    q, idx, commitment = quant(z)
    codes = quant.codebook[idx].permute(0, 3, 1, 2)
    torch.testing.assert_close(q, codes)  # the forward value is the code
    w = torch.randn_like(q)
    (q * w).sum().backward()
    torch.testing.assert_close(z.grad, w)  # the backward is the identity
    z.grad = None
    _, _, commitment = quant(z)
    commitment.backward()
    torch.testing.assert_close(z.grad, 2 * (z - codes).detach() / z.numel())


def test_the_codebook_moves_by_its_ema_as_computed_by_hand():
    quant = Quantizer(3, 2, decay=0.9, restart_threshold=0.0).double()
    quant.codebook.copy_(torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]]))
    quant.ema_sum.copy_(quant.codebook)
    count0, sum0 = quant.ema_count.clone(), quant.ema_sum.clone()
    z = torch.tensor([[1.0, 1.0], [9.0, 1.0], [11.0, -1.0], [0.5, 0.0]], dtype=torch.float64)
    idx = quant.indices(z)
    assert idx.tolist() == [0, 1, 1, 0]
    quant.update(z, idx)
    counts = torch.tensor([2.0, 2.0, 0.0], dtype=torch.float64)
    sums = torch.stack([z[[0, 3]].sum(0), z[[1, 2]].sum(0), torch.zeros(2, dtype=torch.float64)])
    ema_count = 0.9 * count0 + 0.1 * counts
    ema_sum = 0.9 * sum0 + 0.1 * sums
    n, eps = ema_count.sum(), quant.eps
    smoothed = (ema_count + eps) / (n + 3 * eps) * n
    torch.testing.assert_close(quant.ema_count, ema_count)
    torch.testing.assert_close(quant.codebook, ema_sum / smoothed[:, None])


def test_dead_codes_restart_on_encoder_outputs():
    torch.manual_seed(0)
    quant = Quantizer(4, 2, decay=0.5, restart_threshold=0.1)
    quant.codebook.copy_(torch.tensor([[0.0, 0.0], [50.0, 50.0], [60.0, 60.0], [70.0, 70.0]]))
    quant.ema_sum.copy_(quant.codebook)
    z = torch.randn(32, 2)  # every output near code 0: codes 1-3 are never used
    restarted = [quant.update(z, quant.indices(z)) for _ in range(5)]
    assert sum(restarted) == 3 and restarted[-1] == 0
    for k in (1, 2, 3):  # each moved onto one of the batch's outputs, and is now in use
        assert (quant.codebook[k] - z).norm(dim=1).min() < 1.0
    assert len(set(quant.indices(z).tolist())) > 1


def test_tokenize_detokenize_round_trip():
    torch.manual_seed(0)
    model = VQVAE(VQVAEConfig(image_size=32, channels=(8, 16), codebook_size=32, code_dim=8)).eval()
    x = torch.randn(3, 3, 32, 32)
    idx = model.encode(x)
    assert idx.shape == (3, 8, 8) and model.cfg.num_tokens == 64
    out = model(x)
    assert torch.equal(out.indices, idx)
    torch.testing.assert_close(model.decode(idx), out.reconstruction)
    # a code quantizes to itself: tokens -> embeddings -> the same tokens
    assert torch.equal(model.quantizer.indices(model.quantizer.codebook[idx.flatten()]), idx.flatten())


def test_a_tiny_vqvae_learns_rendered_scenes():
    rng = np.random.default_rng(0)
    images = [np.asarray(render_scene(rng, 32)[0], dtype=np.float32) for _ in range(32)]
    x = torch.tensor(np.stack(images)).permute(0, 3, 1, 2) / 127.5 - 1
    torch.manual_seed(0)
    model = VQVAE(VQVAEConfig(image_size=32, channels=(16, 32), codebook_size=64, code_dim=16))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(80):
        out = model(x)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.reconstruction_loss.item())
    assert losses[-1] < 0.3 * losses[0]
    assert len(model.encode(x).unique()) >= 8  # restarts keep many codes in use


def test_bad_configs_are_one_line():
    with pytest.raises(ConfigError, match="multiple of 8"):
        VQVAEConfig(image_size=60)
    with pytest.raises(ConfigError, match="multiples of 8"):
        VQVAEConfig(channels=(12, 24))

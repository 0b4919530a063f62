"""ClipLoss and SigLipLoss against float64 references written independently here (one process)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vlmkit.errors import ConfigError
from vlmkit.losses import ClipLoss, SigLipLoss, create_loss, gather_features


def random_features(n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    text = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    return image, text


def clip_reference(image: np.ndarray, text: np.ndarray, scale: float, bias: float = 0.0) -> float:
    """Symmetric InfoNCE with plain loops over rows and columns."""
    n = len(image)
    logits = [[scale * float(np.dot(image[i], text[j])) + bias for j in range(n)] for i in range(n)]
    image_to_text = 0.0
    text_to_image = 0.0
    for i in range(n):
        row = [logits[i][j] for j in range(n)]
        col = [logits[j][i] for j in range(n)]
        image_to_text += math.log(sum(math.exp(v) for v in row)) - logits[i][i]
        text_to_image += math.log(sum(math.exp(v) for v in col)) - logits[i][i]
    return (image_to_text + text_to_image) / (2 * n)


def siglip_reference(image: np.ndarray, text: np.ndarray, scale: float, bias: float = 0.0) -> float:
    """Mean over images of the summed binary log-losses, with loops over all pairs."""
    n = len(image)
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = scale * float(np.dot(image[i], text[j])) + bias
            label = 1.0 if i == j else -1.0
            total += math.log1p(math.exp(-label * z))  # -log(sigmoid(label * z))
    return total / n


REFERENCES = {"clip": (ClipLoss, clip_reference), "siglip": (SigLipLoss, siglip_reference)}


@pytest.mark.parametrize("name", ["clip", "siglip"])
@pytest.mark.parametrize("bias", [None, -3.0])
def test_loss_matches_float64_reference(name, bias):
    loss_cls, reference = REFERENCES[name]
    image, text = random_features(7, 16, seed=0)
    scale = 12.5
    loss = loss_cls()(image, text, torch.tensor(scale), None if bias is None else torch.tensor(bias))
    expected = reference(image.double().numpy(), text.double().numpy(), scale, bias or 0.0)
    assert loss.dtype == torch.float32 and loss.ndim == 0
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def torch_float64_loss(name: str, image, text, scale, bias):
    """An independent float64 formulation (logsumexp / softplus) to take gradients of."""
    logits = scale * image @ text.T + bias  # (B, B)
    n = len(image)
    if name == "clip":
        diagonal = logits.diagonal()
        image_to_text = (torch.logsumexp(logits, 1) - diagonal).mean()
        text_to_image = (torch.logsumexp(logits, 0) - diagonal).mean()
        return (image_to_text + text_to_image) / 2
    labels = 2 * torch.eye(n, dtype=logits.dtype) - 1
    return F.softplus(-labels * logits).sum() / n


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_gradients_match_float64_autograd(name):
    image, text = random_features(6, 8, seed=1)
    inputs32 = [image.clone(), text.clone(), torch.tensor(9.0), torch.tensor(-2.0)]
    inputs64 = [t.double() for t in inputs32]
    for t in inputs32 + inputs64:
        t.requires_grad_(True)
    create_loss(name)(*inputs32).backward()
    torch_float64_loss(name, *inputs64).backward()
    for got, want in zip(inputs32, inputs64):
        torch.testing.assert_close(got.grad, want.grad.float(), rtol=1e-4, atol=1e-6)
    # The bias shifts every CLIP logit equally, so softmax cross-entropy cannot depend on it.
    if name == "clip":
        assert abs(inputs32[3].grad.item()) < 1e-6


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_float64_inputs_stay_float64_and_pass_gradcheck(name):
    image, text = random_features(4, 5, seed=2)
    inputs = [image.double(), text.double(), torch.tensor(3.0).double(), torch.tensor(-1.0).double()]
    for t in inputs:
        t.requires_grad_(True)
    loss_fn = create_loss(name)
    assert loss_fn(*inputs).dtype == torch.float64
    assert torch.autograd.gradcheck(loss_fn, inputs)


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_bf16_autocast_keeps_float32_logits(name):
    image, text = random_features(16, 32, seed=3)
    scale, bias = torch.tensor(100.0), torch.tensor(-5.0)
    loss_fn = create_loss(name)
    fp32 = loss_fn(image, text, scale, bias)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # float32 features: the loss must not let autocast run its matmul in bfloat16.
        same = loss_fn(image, text, scale, bias)
        # bfloat16 features, as a bf16 model produces: only their rounding differs.
        rounded = loss_fn(image.bfloat16(), text.bfloat16(), scale, bias)
    assert same.dtype == rounded.dtype == torch.float32
    torch.testing.assert_close(same, fp32, rtol=1e-6, atol=0)
    torch.testing.assert_close(rounded, fp32, rtol=2e-2, atol=0)
    # With the matmul in bfloat16, scale 100 amplifies its rounding far beyond 1e-6.
    image_b, text_b = image.bfloat16(), text.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_logits = (scale * image_b @ text_b.T).float()
    assert not torch.allclose(bf16_logits, (scale * image @ text.T), rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_aligned_pairs_score_lower_than_random(name):
    image, text = random_features(8, 32, seed=4)
    loss_fn = create_loss(name)
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
    aligned = loss_fn(image, image.clone(), scale, bias)
    unaligned = loss_fn(image, text, scale, bias)
    assert aligned < unaligned
    # Shuffling the texts of aligned pairs destroys the match and raises the loss again.
    shuffled = loss_fn(image, image[torch.roll(torch.arange(8), 1)], scale, bias)
    assert aligned < shuffled


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_cached_labels_follow_batch_size(name):
    # The label cache is keyed by batch size: alternating sizes must still give the right loss.
    loss_cls, reference = REFERENCES[name]
    loss_fn = loss_cls()
    for n in (4, 6, 4):
        image, text = random_features(n, 8, seed=n)
        expected = reference(image.double().numpy(), text.double().numpy(), 5.0)
        assert loss_fn(image, text, torch.tensor(5.0)).item() == pytest.approx(expected, rel=1e-5)


def test_siglip_without_bias_equals_zero_bias():
    image, text = random_features(5, 8, seed=5)
    loss_fn = SigLipLoss()
    assert loss_fn(image, text, torch.tensor(4.0)) == loss_fn(
        image, text, torch.tensor(4.0), torch.tensor(0.0)
    )


def test_mismatched_feature_shapes_raise():
    image, text = random_features(5, 8, seed=6)
    with pytest.raises(ValueError, match="same B and D"):
        ClipLoss()(image, text[:4], torch.tensor(1.0))


def test_create_loss_by_name():
    assert isinstance(create_loss("clip"), ClipLoss)
    assert isinstance(create_loss("siglip"), SigLipLoss)
    with pytest.raises(ConfigError, match="unknown loss 'infonce'"):
        create_loss("infonce")


def test_gather_is_identity_without_process_group():
    x = torch.randn(3, 4, requires_grad=True)
    assert gather_features(x) is x

"""Video embeddings of a dual encoder (CLIP4Clip's meanP and seqTransf) against float64 recomputations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlmkit.errors import ConfigError
from vlmkit.models.registry import create_model

SMALL = {"vision.image_size": 32, "vision.layers": 1, "text.layers": 1, "embed_dim": 32, "vision.width": 32,
         "text.width": 32, "vision.heads": 2, "text.heads": 2}  # fmt: skip


def _model(pool: str):
    torch.manual_seed(0)
    return create_model("clip-tiny", **SMALL, **{"video.pool": pool}).double().eval()


def test_mean_pool_is_the_normalised_mean_of_normalised_frame_embeddings():
    model = _model("mean")
    clips = torch.randn(2, 5, 3, 32, 32, dtype=torch.float64)
    frames = torch.stack([model.encode_image(c) for c in clips])  # (2, 5, D), one clip at a time
    expected = F.normalize(F.normalize(frames, dim=-1).mean(1), dim=-1)
    assert torch.allclose(model.encode_video(clips, normalize=True), expected, atol=1e-12)
    assert model.temporal is None and not any("temporal" in n for n, _ in model.named_parameters())
    # order-free by construction: a reversed clip has the same embedding
    assert torch.allclose(model.encode_video(clips.flip(1)), model.encode_video(clips), atol=1e-12)


def test_seqtransf_adds_the_temporal_transformer_to_the_frames_and_sees_their_order():
    model = _model("transformer")
    clips = torch.randn(2, 4, 3, 32, 32, dtype=torch.float64)
    x = torch.stack([model.encode_image(c) for c in clips])  # (2, 4, D)
    h = x + model.temporal.frame_embedding[:4]
    for block in model.temporal.blocks:
        h = block(h)
    expected = F.normalize(F.normalize(x + h, dim=-1).mean(1), dim=-1)
    assert torch.allclose(model.encode_video(clips, normalize=True), expected, atol=1e-12)
    assert not torch.allclose(model.encode_video(clips.flip(1)), model.encode_video(clips), atol=1e-6)
    assert torch.allclose(model.pool_frames(x, pool="mean"), _model("mean").pool_frames(x), atol=1e-12)
    with pytest.raises(ConfigError, match="max_frames"):
        model.pool_frames(torch.randn(1, 17, 32, dtype=torch.float64))


def test_forward_on_clips_trains_the_temporal_transformer_and_the_towers():
    model = create_model("clip-tiny", **SMALL, **{"video.pool": "transformer"})
    clips, text = torch.randn(3, 4, 3, 32, 32), torch.randint(0, 100, (3, 8))
    out = model(clips, text)
    assert out.image_features.shape == (3, 32)
    (out.image_features @ out.text_features.T).trace().backward()
    assert model.temporal.frame_embedding.grad.abs().sum() > 0 and model.visual.proj.weight.grad is not None


def test_video_config_is_checked_and_a_temporal_model_is_not_exported_to_hugging_face():
    with pytest.raises(ConfigError, match="video.pool"):
        create_model("clip-tiny", **{"video.pool": "max"})
    from vlmkit.convert.clip import layout_of

    model = create_model("clip-tiny", **{"video.pool": "transformer"})
    with pytest.raises(ConfigError, match="temporal transformer"):
        layout_of(model.cfg)

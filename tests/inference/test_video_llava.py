"""LLaVA with video: frames as images with learned frame positions, the order-blind mean-pool control, a batch of
clips answering as each alone, and the refusals."""

from __future__ import annotations

import pytest
import torch

from vlmkit.data.chat import IMAGE_TOKEN, VIDEO_TOKEN, expand_video
from vlmkit.data.interleaved import CHUNK_TOKEN
from vlmkit.data.tokenizer import Tokenizer
from vlmkit.data.transforms import PreprocessConfig
from vlmkit.errors import ConfigError, DataError
from vlmkit.inference import VLMPipeline
from vlmkit.models.registry import create_model

SMALL = {"vision.image_size": 32, "vision.layers": 1, "vision.width": 32, "vision.heads": 2, "decoder.width": 64,
         "decoder.layers": 2, "decoder.heads": 2, "chat_template": "user_assistant"}  # fmt: skip


@pytest.fixture(scope="module")
def vlm():
    texts = ["USER: which way is the shape moving? ASSISTANT: left right up down"] * 20
    tok = Tokenizer.train(
        texts, vocab_size=300, context_length=128, extra_special_tokens=[IMAGE_TOKEN, CHUNK_TOKEN]
    )
    torch.manual_seed(0)
    model = create_model("llava-tiny", **SMALL, **{"decoder.vocab_size": tok.vocab_size, "max_frames": 8,
                                                   "image_token_id": tok.token_to_id(IMAGE_TOKEN)}).eval()  # fmt: skip
    return VLMPipeline(model, tok, PreprocessConfig(image_size=32), precision="fp32")


def test_a_video_marker_becomes_one_image_per_frame():
    turns = [{"from": "human", "value": f"{VIDEO_TOKEN}\nwhich way?"}, {"from": "gpt", "value": "left"}]
    assert (
        expand_video(turns, 3)[0]["value"] == f"{IMAGE_TOKEN * 3}\nwhich way?"
        and expand_video(turns, 3)[1] == turns[1]
    )


def test_frames_get_their_position_embedding_and_still_images_none(vlm):
    model = vlm.model
    pixels = torch.randn(5, 3, 32, 32)
    n = model.num_image_tokens
    ids = torch.full((1, 5 * n), model.cfg.image_token_id)
    frame_index = torch.tensor([0, 1, 2, -1, 0])  # a 3-frame clip, a still image, a 1-frame clip
    with torch.no_grad():
        got = model.embed_inputs(ids, pixels, frame_index)[0].view(5, n, -1)
        images = model.encode_images(pixels)
    table = model.projector.frame_embedding
    for i, f in enumerate(frame_index.tolist()):
        expected = images[i] + (table[f] if f >= 0 else 0)
        assert torch.allclose(got[i], expected, atol=1e-6)


def test_mean_pool_is_blind_to_frame_order_and_the_model_is_not(vlm):
    clip = torch.randn(4, 3, 32, 32)
    q = ["which way is the shape moving?"]
    model = vlm.model
    ids = torch.full((1, 4 * model.num_image_tokens), model.cfg.image_token_id)
    idx = torch.arange(4)
    with torch.no_grad():
        mean = model.embed_inputs(ids, clip, idx, time_pool="mean")
        mean_reversed = model.embed_inputs(ids, clip.flip(0), idx, time_pool="mean")
        plain = model.embed_inputs(ids, clip, idx)
        plain_reversed = model.embed_inputs(ids, clip.flip(0), idx)
    assert torch.allclose(mean, mean_reversed, atol=1e-6) and not torch.allclose(
        plain, plain_reversed, atol=1e-3
    )
    assert vlm.answer_video([clip], q, time_pool="mean") == vlm.answer_video(
        [clip.flip(0)], q, time_pool="mean"
    )


def test_a_batch_of_clips_answers_as_each_clip_alone(vlm):
    torch.manual_seed(1)
    clips = [torch.randn(4, 3, 32, 32) for _ in range(3)]
    questions = ["which way is the shape moving?", "which way?", "is the shape moving left or right?"]
    together = vlm.answer_video(clips, questions, max_new_tokens=5)
    alone = [vlm.answer_video([c], [q], max_new_tokens=5)[0] for c, q in zip(clips, questions)]
    assert together == alone


def test_a_still_image_model_and_too_many_frames_are_refused(vlm):
    with pytest.raises(DataError, match="max_frames"):
        vlm.answer_video([torch.randn(9, 3, 32, 32)], ["q"])
    still = create_model("llava-tiny", **SMALL).eval()
    ids = torch.full((1, still.num_image_tokens), still.cfg.image_token_id)
    with pytest.raises(ConfigError, match="still images only"):
        still.embed_inputs(ids, torch.randn(1, 3, 32, 32), torch.tensor([0]))
    from vlmkit.convert.llava import config_to_hf_llava

    with pytest.raises(ConfigError, match="frame positions"):
        config_to_hf_llava(vlm.model.cfg)

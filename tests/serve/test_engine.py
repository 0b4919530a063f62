"""The serving engine, stepped by hand: slot caches equal a plain forward, continuous batching gives each
request the tokens it gets alone (greedy), cancelling frees the slot, a full queue refuses, stop strings cut
the text, seeded sampling repeats, and batched embeddings equal one-at-a-time ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vlmkit.data.chat import IMAGE_TOKEN
from vlmkit.data.tokenizer import Tokenizer
from vlmkit.data.transforms import PreprocessConfig
from vlmkit.inference import VLMPipeline
from vlmkit.models.decoder import Decoder, DecoderConfig
from vlmkit.models.registry import create_model
from vlmkit.nn.kv_cache import SlotKVCache
from vlmkit.serve.engine import (
    ContinuousBatcher,
    EmbeddingBatcher,
    EmbeddingRequest,
    GenerationRequest,
    Overloaded,
    SamplingParams,
    _held_back,
)

TEXTS = ["USER: what colour is the circle? ASSISTANT: red", "USER: is it big? ASSISTANT: yes it is",
         "a blue square on the left and a green star", "how many shapes are there? two"] * 20  # fmt: skip


@pytest.fixture(scope="module")
def pipeline():
    tok = Tokenizer.train(TEXTS, vocab_size=300, context_length=128, extra_special_tokens=[IMAGE_TOKEN])
    torch.manual_seed(0)
    small = {"vision.image_size": 32, "vision.layers": 1, "vision.width": 32, "vision.heads": 2, "decoder.width": 64,
             "decoder.layers": 2, "decoder.heads": 4, "decoder.kv_heads": 2, "decoder.vocab_size": tok.vocab_size,
             "image_token_id": tok.token_to_id(IMAGE_TOKEN), "chat_template": "user_assistant",
             "decoder.max_seq_len": 128}  # fmt: skip
    model = create_model("llava-tiny", **small).eval()
    return VLMPipeline(model, tok, PreprocessConfig(image_size=32), precision="fp32")


def _image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8))


def _request(pipeline, question: str, image, params: SamplingParams, events: list):
    turn = [{"from": "human", "value": (f"{IMAGE_TOKEN}\n" if image is not None else "") + question}]
    pixels = pipeline.pixel_values([image]) if image is not None else None
    return GenerationRequest(pipeline.prompt_ids(turn), pixels, params, events.append)


def _text(events: list) -> str:
    return "".join(e["text"] for e in events if e["type"] == "delta")


def _alone(pipeline, question: str, image, max_tokens: int) -> str:
    turn = [{"from": "human", "value": (f"{IMAGE_TOKEN}\n" if image is not None else "") + question}]
    config = pipeline.generation_config(max_new_tokens=max_tokens)
    return pipeline.generate([[image] if image is not None else []], [turn], config)[0]


def test_slot_cache_rows_at_their_own_lengths_equal_a_plain_forward():
    torch.manual_seed(0)
    dec = Decoder(DecoderConfig(vocab_size=50, width=32, layers=2, heads=4, kv_heads=2)).eval()
    seqs = [torch.randint(0, 50, (n,)) for n in (7, 3, 11)]
    cache = SlotKVCache(2, 4, 2, 8, 32)
    with torch.no_grad():
        # slots 3 and 0 prefilled together (right padded), slot 1 later, then decoding steps over all three
        cache.select([3, 0], [7, 3])
        x = torch.nn.utils.rnn.pad_sequence([seqs[0], seqs[1]], batch_first=True)
        h = dec(x, cache=cache, logits="all").logits
        torch.testing.assert_close(h[0, 6], dec(seqs[0][None]).logits[0, -1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(h[1, 2], dec(seqs[1][None]).logits[0, -1], atol=1e-5, rtol=1e-5)
        cache.select([1], [11])
        dec(seqs[2][None], cache=cache, logits="none")
        for _ in range(4):
            new = torch.randint(0, 50, (3,))
            cache.select([0, 1, 3], [1, 1, 1])
            got = dec(new[:, None], cache=cache, logits="last").logits[:, -1]
            seqs = [torch.cat([s, t[None]]) for s, t in zip(seqs, new[[2, 0, 1]])]  # slot 3 = seqs[0], ...
            want = torch.stack([dec(seqs[i][None]).logits[0, -1] for i in (1, 2, 0)])
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert cache.lengths.tolist() == [7, 15, 0, 11]


def test_continuous_batching_gives_each_request_the_tokens_it_gets_alone(pipeline):
    cases = [("what colour is the circle?", _image(0), 12), ("is it big?", _image(1), 5),
             ("how many shapes are there?", None, 9), ("a blue square", _image(2), 16),
             ("is it big? yes", _image(3), 7)]  # fmt: skip
    batcher = ContinuousBatcher(pipeline, num_slots=3)
    events = [[] for _ in cases]
    requests = [_request(pipeline, q, im, SamplingParams(n, temperature=0), ev)
                for (q, im, n), ev in zip(cases, events)]  # fmt: skip
    batcher.submit(requests[0])
    batcher.step()
    batcher.submit(requests[1])
    batcher.step()
    for r in requests[2:]:  # more than the free slots: they wait, then join as others leave
        batcher.submit(r)
    steps, busy = 0, 0
    while batcher.has_work():
        busy = max(busy, batcher.active)
        batcher.step()
        steps += 1
    assert busy == 3 and steps < sum(n for _, _, n in cases)
    for (q, im, n), ev in zip(cases, events):
        assert _text(ev) == _alone(pipeline, q, im, n)
        finish = ev[-1]
        assert finish["type"] == "finish" and finish["reason"] in ("stop", "length")
        assert finish["usage"]["completion_tokens"] <= n
        assert sum(e["type"] == "finish" for e in ev) == 1
    assert batcher.cache.lengths.tolist() == [0, 0, 0]


def test_coca_cross_attention_is_served_from_slots_as_alone():
    tok = Tokenizer.train(TEXTS, vocab_size=300, context_length=64)
    torch.manual_seed(1)
    small = {"vision.image_size": 32, "vision.layers": 1, "vision.width": 32, "vision.heads": 2, "decoder.width": 64,
             "decoder.layers": 2, "decoder.heads": 2, "decoder.vocab_size": tok.vocab_size,
             "decoder.cross_attention_start": 1}  # fmt: skip
    coca = VLMPipeline(
        create_model("coca-tiny", **small).eval(), tok, PreprocessConfig(image_size=32), precision="fp32"
    )
    cases = [
        ("what colour is the circle?", 0, 10),
        ("is it big?", 1, 6),
        ("a blue square", 2, 12),
        ("two", 3, 8),
    ]
    batcher = ContinuousBatcher(coca, num_slots=2)
    events = [[] for _ in cases]
    for (q, seed, n), ev in zip(cases, events):
        turn = [{"from": "human", "value": f"{IMAGE_TOKEN}\n{q}"}]
        batcher.submit(GenerationRequest(coca.chat_prompt_ids(turn), coca.pixel_values([_image(seed)]),
                                         SamplingParams(n, temperature=0), ev.append))  # fmt: skip
        batcher.step()  # each joins while the others decode
    while batcher.has_work():
        batcher.step()
    for (q, seed, n), ev in zip(cases, events):
        turn = [{"from": "human", "value": f"{IMAGE_TOKEN}\n{q}"}]
        want = coca.generate([_image(seed)], [turn], coca.generation_config(max_new_tokens=n))[0]
        assert _text(ev) == want and ev[-1]["type"] == "finish"
    assert len(batcher.cache.cross.k) == 1  # the one cross-attending layer, stored per slot
    bad = []
    batcher.submit(GenerationRequest(coca.chat_prompt_ids([{"from": "human", "value": "hi"}]), None,
                                     SamplingParams(3, temperature=0), bad.append))  # fmt: skip
    batcher.step()
    assert bad[-1]["type"] == "error" and "one image" in bad[-1]["message"]


def test_bf16_autocast_serves_as_it_generates_alone(pipeline):
    """`precision: auto` picks bf16 on CPUs that have it: the slots then take bf16 keys into fp32 buffers."""
    bf16 = VLMPipeline(pipeline.model, pipeline.tokenizer, PreprocessConfig(image_size=32), precision="bf16")
    batcher = ContinuousBatcher(bf16, num_slots=2)
    events = [[], []]
    for ev, (q, seed) in zip(events, [("is it big?", 1), ("a blue square", 2)]):
        batcher.submit(_request(bf16, q, _image(seed), SamplingParams(8, temperature=0), ev))
    while batcher.has_work():
        batcher.step()
    for ev, (q, seed) in zip(events, [("is it big?", 1), ("a blue square", 2)]):
        assert ev[-1]["type"] == "finish" and _text(ev) == _alone(bf16, q, _image(seed), 8)


def test_cancelling_frees_the_slot_for_a_waiting_request(pipeline):
    batcher = ContinuousBatcher(pipeline, num_slots=1)
    first, second = [], []
    a = _request(pipeline, "is it big?", _image(0), SamplingParams(50, temperature=0), first)
    b = _request(pipeline, "is it big?", _image(1), SamplingParams(3, temperature=0), second)
    batcher.submit(a)
    batcher.submit(b)
    batcher.step()
    assert batcher.slots[0].request is a and len(batcher.waiting) == 1
    a.cancel()
    batcher.step()
    assert batcher.slots[0] is not None and batcher.slots[0].request is b
    n = len(first)
    while batcher.has_work():
        batcher.step()
    assert len(first) == n and not any(e["type"] == "finish" for e in first)  # nothing after the cancel
    assert second[-1]["type"] == "finish"


def test_a_full_queue_refuses_and_a_prompt_longer_than_the_context_is_refused(pipeline):
    batcher = ContinuousBatcher(pipeline, num_slots=1, max_waiting=2)
    for _ in range(2):
        batcher.submit(_request(pipeline, "hi", None, SamplingParams(2, temperature=0), []))
    with pytest.raises(Overloaded):
        batcher.submit(_request(pipeline, "hi", None, SamplingParams(2, temperature=0), []))
    small = ContinuousBatcher(pipeline, num_slots=1, max_len=8)
    with pytest.raises(ValueError, match="context holds 8"):
        small.submit(_request(pipeline, "what colour is the circle? is it big?", None, SamplingParams(2), []))


def test_the_context_limit_ends_a_request_with_length(pipeline):
    turn = [{"from": "human", "value": "is it big?"}]
    prompt = len(pipeline.prompt_ids(turn))
    batcher = ContinuousBatcher(pipeline, num_slots=2, max_len=prompt + 3)
    events = []
    batcher.submit(_request(pipeline, "is it big?", None, SamplingParams(100, temperature=0), events))
    while batcher.has_work():
        batcher.step()
    assert events[-1]["reason"] in ("length", "stop")
    assert events[-1]["usage"]["total_tokens"] <= prompt + 3


def test_stop_strings_cut_the_text_and_text_that_may_start_one_is_held_back(pipeline):
    assert _held_back("the red ci", ["circle"]) == 2 and _held_back("the red", ["circle"]) == 0
    assert _held_back("abc", ["cx", "bcy"]) == 2
    full = _alone(pipeline, "a blue square", _image(2), 16)
    assert len(full) > 6, full
    stop = full[3:6]
    events = []
    batcher = ContinuousBatcher(pipeline, num_slots=2)
    batcher.submit(_request(pipeline, "a blue square", _image(2), SamplingParams(16, 0, stop=[stop]), events))
    while batcher.has_work():
        batcher.step()
    assert _text(events) == full[: full.find(stop)] and events[-1]["reason"] == "stop"


def test_seeded_sampling_repeats_whatever_runs_beside_it(pipeline):
    def run(neighbours: int) -> str:
        batcher = ContinuousBatcher(pipeline, num_slots=4)
        events = []
        params = SamplingParams(12, temperature=1.0, top_p=0.9, seed=7)
        batcher.submit(_request(pipeline, "what colour is the circle?", _image(0), params, events))
        for i in range(neighbours):
            batcher.submit(_request(pipeline, "is it big?", _image(i + 5), SamplingParams(12, 1.0), []))
        while batcher.has_work():
            batcher.step()
        return _text(events)

    assert run(0) == run(3)


def test_embeddings_are_batched_and_equal_one_at_a_time():
    torch.manual_seed(0)
    calls = []
    proj = torch.randn(5, 4)

    def texts(xs):
        calls.append(("text", len(xs)))
        return torch.stack([proj[len(x) % 5] for x in xs])

    def images(pixels):
        calls.append(("image", len(pixels)))
        return pixels.flatten(1)[:, :4]

    batcher = EmbeddingBatcher(texts, images, max_batch=4, max_wait_s=10.0)
    out = [[] for _ in range(4)]
    pixels = torch.randn(2, 3, 2, 2)
    batcher.submit(EmbeddingRequest(["a", "bb"], None, out[0].append))
    assert batcher.wait_s() > 1  # below max_batch: waits for more
    batcher.submit(EmbeddingRequest(["ccc"], pixels[:1], out[1].append))
    assert batcher.wait_s() == 0.0  # 4 inputs: due now
    batcher.submit(EmbeddingRequest([], pixels[1:], out[2].append))
    assert batcher.step() == 2 and calls == [("text", 3), ("image", 1)]  # whole requests, up to max_batch
    batcher.submit(EmbeddingRequest(["dddd"], None, out[3].append))
    assert batcher.step() == 2
    torch.testing.assert_close(out[0][0]["text"], torch.stack([proj[1], proj[2]]))
    torch.testing.assert_close(out[1][0]["image"], pixels[:1].flatten(1)[:, :4])
    torch.testing.assert_close(out[2][0]["image"], pixels[1:].flatten(1)[:, :4])
    assert out[2][0]["text"] is None and out[3][0]["text"].shape == (1, 4)

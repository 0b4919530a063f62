"""`vlmkit serve` as clients use it: the official `openai` package (chat, streaming, embeddings, errors as its
exception types) and plain HTTP (image embeddings, labels, search, overload, cancellation) against a server
on localhost; answers checked against the same model run directly."""

from __future__ import annotations

import asyncio
import base64
import io
import struct
import threading
import time
import zlib

import httpx
import numpy as np
import openai
import pytest
import torch
from PIL import Image

from vlmkit.data.chat import IMAGE_TOKEN


def _data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8))


def _messages(question: str, image: Image.Image | None = None) -> list[dict]:
    content = [{"type": "text", "text": question}]
    if image is not None:
        content.insert(0, {"type": "image_url", "image_url": {"url": _data_url(image)}})
    return [{"role": "user", "content": content}]


def _alone(server, question: str, image, max_tokens: int) -> str:
    pipe = server.models["llava"].pipeline
    turn = [{"from": "human", "value": (f"{IMAGE_TOKEN}\n" if image is not None else "") + question}]
    return pipe.generate([[image] if image is not None else []], [turn],
                         pipe.generation_config(max_new_tokens=max_tokens))[0]  # fmt: skip


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)


def test_models_are_listed(client):
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {"llava", "clip"} and models["llava"].object == "model"
    assert client.models.retrieve("clip").id == "clip"


def test_chat_completion_answers_as_the_model_does_alone(client, server):
    image = _image(1)
    r = client.chat.completions.create(model="llava", messages=_messages("is it big?", image), max_tokens=12,
                                       temperature=0)  # fmt: skip
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == "llava"
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert choice.message.content == _alone(server, "is it big?", image, 12)
    assert (
        r.usage.completion_tokens <= 12
        and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    )
    assert r.usage.prompt_tokens > server.models["llava"].pipeline.num_image_tokens


def test_streaming_sends_chunks_a_finish_reason_usage_and_done(client, server):
    image = _image(2)
    kwargs = dict(model="llava", messages=_messages("what colour is the circle?", image), max_tokens=10,
                  temperature=0)  # fmt: skip
    full = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(
        client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishes) == 1 and finishes[0] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    with httpx.stream("POST", server.url + "/v1/chat/completions", json={**kwargs, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_sampling_parameters_and_seed(client):
    kwargs = dict(model="llava", messages=_messages("is it big?", _image(3)), max_tokens=8, temperature=1.5,
                  top_p=0.9, seed=11)  # fmt: skip
    a = client.chat.completions.create(**kwargs).choices[0].message.content
    b = client.chat.completions.create(**kwargs).choices[0].message.content
    assert a == b


def test_text_embeddings_equal_the_model_and_base64_decodes_to_them(client, server):
    from vlmkit.inference.embed import embed_texts
    from vlmkit.runtime import resolve_precision

    m = server.models["clip"]
    texts = ["a red circle", "a photo of a blue square."]
    r = client.embeddings.create(model="clip", input=texts)
    want = embed_texts(m.model, m.tokenizer, texts, torch.device("cpu"), resolve_precision("fp32", "cpu"))
    got = torch.tensor([d.embedding for d in r.data])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert [d.index for d in r.data] == [0, 1] and r.usage.prompt_tokens > 0
    raw = httpx.post(
        server.url + "/v1/embeddings", json={"model": "clip", "input": texts, "encoding_format": "base64"}
    )
    vec = np.frombuffer(base64.b64decode(raw.json()["data"][1]["embedding"]), dtype=np.float32)
    np.testing.assert_allclose(vec, want[1].numpy(), atol=1e-5)


def test_image_embeddings_as_content_parts(server):
    from vlmkit.inference.embed import embed_images
    from vlmkit.runtime import resolve_precision

    m = server.models["clip"]
    images = [_image(4), _image(5)]
    body = {"model": "clip", "input": [{"content": [{"type": "image_url", "image_url": {"url": _data_url(im)}}]}
                                       for im in images] + ["a red circle"]}  # fmt: skip
    r = httpx.post(server.url + "/v1/embeddings", json=body).json()
    want = embed_images(
        m.model, m.transform.cfg, images, torch.device("cpu"), resolve_precision("fp32", "cpu")
    )
    got = torch.tensor([d["embedding"] for d in r["data"][:2]])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert len(r["data"]) == 3


def test_zero_shot_labels_equal_classify(server):
    from vlmkit.inference import classify
    from vlmkit.runtime import resolve_precision

    m = server.models["clip"]
    image = _image(6)
    labels = ["red circle", "blue square", "green star"]
    r = httpx.post(server.url + "/v1/classify", json={"model": "clip", "image": {"url": _data_url(image)},
                                                      "labels": labels, "template": "a photo of a {}."}).json()  # fmt: skip
    want = classify(m.model, m.tokenizer, m.transform.cfg, image, labels, ["a photo of a {}."], torch.device("cpu"),
                    resolve_precision("fp32", "cpu"))  # fmt: skip
    assert [d["label"] for d in r["data"]] == [label for label, _ in want]
    np.testing.assert_allclose([d["score"] for d in r["data"]], [p for _, p in want], atol=1e-5)


def test_search_returns_the_brute_force_cosine_top_k(server, index_dir):
    from vlmkit.inference.embed import embed_texts
    from vlmkit.inference.index import ImageIndex
    from vlmkit.runtime import resolve_precision

    m = server.models["clip"]
    index = ImageIndex.load(index_dir)
    r = httpx.post(server.url + "/v1/search", json={"query": "a red circle", "top_k": 4}).json()
    q = embed_texts(
        m.model, m.tokenizer, ["a red circle"], torch.device("cpu"), resolve_precision("fp32", "cpu")
    )
    scores = index.embeddings @ q[0].numpy()
    best = np.argsort(-scores)[:4]
    assert [d["path"] for d in r["data"]] == [index.paths[i] for i in best]
    np.testing.assert_allclose([d["score"] for d in r["data"]], scores[best], atol=1e-5)
    thumb = httpx.get(server.url + r["data"][0]["url"])
    assert thumb.status_code == 200 and Image.open(io.BytesIO(thumb.content)).size[0] == 32
    by_image = httpx.post(server.url + "/v1/search", json={
        "query": {"type": "image_url", "image_url": {"url": f"file://{index.root / index.paths[2]}"}}, "top_k": 1}).json()  # fmt: skip
    assert by_image["data"][0]["path"] == index.paths[2] and by_image["data"][0]["score"] == pytest.approx(
        1, abs=1e-4
    )


def _bomb() -> str:
    """A PNG whose header says 20000 x 20000 pixels (400 megapixels) in a few hundred bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)  # 8-bit greyscale
    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 20001))
        + chunk(b"IEND", b"")
    )
    return "data:image/png;base64," + base64.b64encode(png).decode()


@pytest.mark.parametrize("case", ["base64", "not_image", "bomb", "remote", "outside_root", "model", "context",
                                  "n", "marker", "embedding_model_chat"])  # fmt: skip
def test_bad_requests_get_openai_errors_and_the_server_survives(client, server, case, tmp_path):
    part = lambda url: {"type": "image_url", "image_url": {"url": url}}  # noqa: E731
    messages = {
        "base64": [{"role": "user", "content": [part("data:image/png;base64,@@not base64@@")]}],
        "not_image": [{"role": "user", "content": [part("data:image/png;base64," + base64.b64encode(b"hello").decode())]}],
        "bomb": [{"role": "user", "content": [part(_bomb())]}],
        "remote": [{"role": "user", "content": [part("https://example.com/cat.png")]}],
        "outside_root": [{"role": "user", "content": [part(f"file://{tmp_path}/x.png")]}],
        "marker": [{"role": "user", "content": "look: <image>"}],
    }.get(case, _messages("hi"))  # fmt: skip
    kwargs = {"model": {"model": "nope", "embedding_model_chat": "clip"}.get(case, "llava"), "messages": messages,
              "max_tokens": {"context": 10_000}.get(case, 4)}  # fmt: skip
    if case == "n":
        kwargs["n"] = 2
    expected = {"model": openai.NotFoundError, "bomb": openai.APIStatusError}.get(
        case, openai.BadRequestError
    )
    with pytest.raises(expected) as err:
        client.chat.completions.create(**kwargs)
    status = {"model": 404, "bomb": 413}.get(case, 400)
    assert err.value.status_code == status
    body = err.value.body
    assert set(body) == {"message", "type", "param", "code"} and body["message"]
    code = {"base64": "invalid_base64", "not_image": "invalid_image", "bomb": "image_too_large",
            "remote": "invalid_image_url", "outside_root": "image_path_not_allowed", "model": "model_not_found",
            "context": "context_length_exceeded", "embedding_model_chat": "wrong_model_kind"}.get(case)  # fmt: skip
    if code:
        assert body["code"] == code
    ok = client.chat.completions.create(model="llava", messages=_messages("hi"), max_tokens=2, temperature=0)
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_malformed_json_unknown_routes_and_a_long_prompt(server):
    r = httpx.post(
        server.url + "/v1/chat/completions",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    long = _messages("is it big? " * 200)
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "llava", "messages": long})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_an_error_during_a_stream_arrives_as_an_error_event_then_done(client, server, monkeypatch):
    batcher = server.models["llava"].batcher

    def broken(runs):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(batcher, "_decode", broken)
    with pytest.raises(openai.APIError, match="simulated failure"):
        for _ in client.chat.completions.create(
            model="llava", messages=_messages("hi"), max_tokens=8, stream=True
        ):
            pass
    with httpx.stream("POST", server.url + "/v1/chat/completions",
                      json={"model": "llava", "messages": _messages("hi"), "max_tokens": 8, "stream": True}) as r:  # fmt: skip
        lines = [line for line in r.iter_lines() if line]
    assert '"error"' in lines[-2] and lines[-1] == "data: [DONE]"
    with pytest.raises(openai.InternalServerError, match="simulated failure") as err:
        client.chat.completions.create(model="llava", messages=_messages("hi"), max_tokens=8)
    assert err.value.status_code == 500 and err.value.body["type"] == "server_error"
    monkeypatch.undo()
    assert client.chat.completions.create(model="llava", messages=_messages("hi"), max_tokens=2).choices


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server, monkeypatch):
    batcher = server.models["llava"].batcher
    real = batcher._decode
    monkeypatch.setattr(batcher, "_decode", lambda runs: time.sleep(0.02) or real(runs))  # 50 tokens: >1 s
    body = {"model": "llava", "messages": _messages("what colour is the circle?", _image(7)), "max_tokens": 50,
            "ignore_eos": True, "stream": True}  # fmt: skip
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():  # up to the first token: the request holds a slot
            if '"delta": {"content": "' in line and '"content": ""' not in line:
                break
        assert batcher.active == 1
    deadline = time.monotonic() + 10
    while batcher.active and time.monotonic() < deadline:
        time.sleep(0.05)
    assert batcher.active == 0


def test_a_flood_gets_answers_or_429_and_nothing_hangs(server, monkeypatch):
    batcher = server.models["llava"].batcher  # 4 slots, 8 may wait
    gate, real = threading.Event(), batcher.step

    def held():  # the engine stops before admitting anyone until the 429s are out: a deterministic flood
        gate.wait(60)
        real()

    monkeypatch.setattr(batcher, "step", held)

    async def flood() -> list[int]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            body = {"model": "llava", "messages": _messages("is it big?"), "max_tokens": 6, "temperature": 0}
            tasks = [asyncio.create_task(c.post("/v1/chat/completions", json=body)) for _ in range(24)]
            while sum(t.done() for t in tasks) < 16:
                await asyncio.sleep(0.05)
            gate.set()
            rs = await asyncio.gather(*tasks)
        for r in rs:
            if r.status_code == 429:
                assert r.json()["error"]["type"] == "rate_limit_error"
        return [r.status_code for r in rs]

    codes = asyncio.run(asyncio.wait_for(flood(), 120))
    assert codes.count(200) == 8 and codes.count(429) == 16


def test_images_by_path_only_under_the_image_root(client, server, served_dirs):
    inside = served_dirs["images"] / "01.png"
    r = client.chat.completions.create(model="llava", max_tokens=3, temperature=0, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"file://{inside}"}},
                                     {"type": "text", "text": "is it big?"}]}])  # fmt: skip
    assert r.choices[0].message.content == _alone(server, "is it big?", Image.open(inside).convert("RGB"), 3)
    escape = served_dirs["images"] / ".." / "llava" / "config.json"
    with pytest.raises(openai.BadRequestError, match="only under"):
        client.chat.completions.create(model="llava", max_tokens=3, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(escape)}}]}])  # fmt: skip


def test_a_body_over_the_limit_is_413(server, monkeypatch):
    import vlmkit.serve.app as app_module

    monkeypatch.setattr(app_module, "MAX_BODY_BYTES", 1000)
    r = httpx.post(
        server.url + "/v1/chat/completions", json={"model": "llava", "messages": _messages("x" * 2000)}
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_models_the_server_cannot_chat_with_are_refused_when_loading(tmp_path):
    from vlmkit.data.tokenizer import Tokenizer
    from vlmkit.data.transforms import PreprocessConfig
    from vlmkit.errors import ConfigError
    from vlmkit.models.pretrained import save_pretrained
    from vlmkit.models.registry import create_model
    from vlmkit.serve.app import load_served

    tok = Tokenizer.train(["a red circle", "a blue square"] * 10, vocab_size=300, context_length=16,
                          extra_special_tokens=["<image>", "<|endofchunk|>"])  # fmt: skip
    small = {"vision.image_size": 32, "decoder.vocab_size": tok.vocab_size, "perceiver.latents": 4,
             "image_token_id": tok.token_to_id("<image>"), "chunk_token_id": tok.token_to_id("<|endofchunk|>")}  # fmt: skip
    model = create_model("flamingo-tiny", **small)
    folder = save_pretrained(model, tmp_path / "flamingo", tok, PreprocessConfig(image_size=32))
    with pytest.raises(
        ConfigError, match="flamingo model; `vlmkit serve` serves LLaVA-style and CoCa models"
    ):
        load_served(str(folder))

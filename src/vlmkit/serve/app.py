"""`vlmkit serve`: vlmkit models behind the OpenAI API (FastAPI), plus zero-shot labels, image search and a page.

    app = create_app([load_served("runs/llava-tiny-shapes"), load_served("runs/clip-tiny")], index="photos.index")
    uvicorn.run(app, host="127.0.0.1", port=8000)

Routes: `GET /v1/models`; `POST /v1/chat/completions` (generative models: LLaVA-style and CoCa, continuous batching),
non-streaming or server-sent events; `POST /v1/embeddings` (dual encoders: texts, and images as content
parts, dynamically batched); `POST /v1/classify` (zero-shot labels for an image); `POST /v1/search` (top-k
images of an index for a text or an image); `GET /v1/index/images/{i}` (an indexed image, for thumbnails);
`GET /` (the page, `vlmkit/serve/static`). The event loop only parses, decodes images (in worker threads)
and streams: every model forward runs on the engine thread (`vlmkit.serve.engine`).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from vlmkit.errors import ConfigError, VlmkitError
from vlmkit.inference.embed import label_probabilities

try:
    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
    from fastapi.staticfiles import StaticFiles
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
except ImportError:  # pragma: no cover - the optional extra
    raise ConfigError("`vlmkit serve` needs FastAPI and uvicorn: pip install 'vlmkit[serve]'") from None
from vlmkit.serve.engine import (
    ContinuousBatcher,
    EmbeddingBatcher,
    EmbeddingRequest,
    Engine,
    GenerationRequest,
    Overloaded,
    SamplingParams,
)
from vlmkit.serve.protocol import APIError, bad, decode_image, parse_chat, parse_embedding_inputs

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
MAX_BODY_BYTES = 32 * 2**20


@dataclass
class ServedModel:
    """A loaded model and the batcher that runs it: kind "chat" (generative) or "embedding" (dual encoder)."""

    name: str
    kind: str
    batcher: object
    pipeline: object = None  # chat: the VLMPipeline
    model: object = None  # embedding: the dual encoder
    tokenizer: object = None
    transform: object = None  # PIL image -> normalised (3, S, S)
    created: int = field(default_factory=lambda: int(time.time()))


def load_served(path: str, name: str | None = None, device: str = "cpu", precision: str = "auto",
                num_slots: int = 8, max_len: int | None = None, max_waiting: int = 32, max_batch: int = 32,
                max_wait_ms: float = 5.0, prefill_threads: int | None = None) -> ServedModel:  # fmt: skip
    """Load a model folder (vlmkit's or Hugging Face's) for serving."""
    from vlmkit.convert import load_pretrained
    from vlmkit.data.transforms import ImageTransform
    from vlmkit.inference import VLMPipeline
    from vlmkit.inference.embed import embed_texts
    from vlmkit.models.registry import model_family
    from vlmkit.runtime import resolve_precision

    name = name or Path(path).resolve().name
    pt = load_pretrained(path, device)
    family = model_family(pt.model.cfg)
    if family == "clip":
        if pt.tokenizer is None:
            raise ConfigError(f"{path} has no tokenizer.json: text embeddings need the model's tokenizer")
        prec = resolve_precision(precision, torch.device(device))
        model, tok = pt.model, pt.tokenizer
        from vlmkit.eval.features import encode_images

        batcher = EmbeddingBatcher(
            lambda texts: embed_texts(model, tok, texts, torch.device(device), prec),
            lambda pixels: encode_images(model, pixels, max_batch, device, prec.bf16),
            max_batch=max_batch, max_wait_s=max_wait_ms / 1000, max_waiting=max_waiting * 8,
        )  # fmt: skip
        return ServedModel(name, "embedding", batcher, model=model, tokenizer=tok,
                           transform=ImageTransform(pt.preprocess, train=False))  # fmt: skip
    if family not in ("llava", "coca"):
        raise ConfigError(
            f"{path} is a {family} model; `vlmkit serve` serves LLaVA-style and CoCa models (chat) and dual "
            "encoders (embeddings, zero-shot labels, search)"
        )
    pipeline = VLMPipeline(pt.model, pt.tokenizer, pt.preprocess, device=device, precision=precision)
    batcher = ContinuousBatcher(pipeline, num_slots=num_slots, max_len=max_len, max_waiting=max_waiting,
                                prefill_threads=prefill_threads)  # fmt: skip
    return ServedModel(name, "chat", batcher, pipeline=pipeline, tokenizer=pt.tokenizer,
                       transform=pipeline.transform)  # fmt: skip


def create_app(models: list[ServedModel], index: str | Path | None = None, image_roots=(),
               index_model: str | None = None, engine: Engine | None = None):  # fmt: skip
    """The FastAPI app serving `models` (and an image index for `/v1/search`, embedded by `index_model`:
    by default the served dual encoder the index was built with)."""
    by_name = {m.name: m for m in models}
    if len(by_name) != len(models):
        raise ConfigError("two served models have the same name; name them with --model NAME=PATH")
    roots = [Path(r).resolve() for r in image_roots]
    search = _load_index(index, by_name, index_model) if index else None
    engine = engine or Engine([m.batcher for m in models])

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="vlmkit", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(VlmkitError)
    async def vlmkit_error(request, e: VlmkitError):  # a DataError / ConfigError about the request's content
        return JSONResponse(bad(str(e)).body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return JSONResponse(APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", None,
                                     code).body(), status_code=e.status_code)  # fmt: skip

    @app.exception_handler(Exception)
    async def server_error(request, e: Exception):
        log.exception("unhandled error")
        return JSONResponse(APIError(500, f"internal error: {type(e).__name__}: {e}").body(), status_code=500)

    async def read_json(request: Request) -> dict:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
            raise APIError(
                413, f"the request body is over {MAX_BODY_BYTES // 2**20} MB", None, "request_too_large"
            )
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > MAX_BODY_BYTES:
                raise APIError(413, f"the request body is over {MAX_BODY_BYTES // 2**20} MB", None,
                               "request_too_large")  # fmt: skip
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise bad(f"the request body is not valid JSON ({e})") from None

    def served(name: str, kind: str) -> ServedModel:
        m = by_name.get(name)
        if m is None:
            raise APIError(404, f"the model '{name}' does not exist; served: {', '.join(by_name)}", "model",
                           "model_not_found")  # fmt: skip
        if m.kind != kind:
            what = {"chat": "/v1/chat/completions", "embedding": "/v1/embeddings, /v1/classify or /v1/search"}
            raise bad(f"'{name}' is a {m.kind} model: use {what[m.kind]}", "model", "wrong_model_kind")
        return m

    def images_of(pairs, m: ServedModel) -> torch.Tensor | None:
        """Decode (url, param) pairs and preprocess them (worker thread): (N, 3, S, S) or None."""
        if not pairs:
            return None
        return torch.stack([m.transform(decode_image(url, param, roots)) for url, param in pairs])

    async def submit(batcher, request):
        try:
            engine.submit(batcher, request)
        except Overloaded as e:
            raise APIError(
                429, f"the server is busy ({e}); retry shortly", None, "rate_limit_exceeded"
            ) from None
        except ValueError as e:
            raise bad(str(e)) from None

    dispatch = _Dispatcher()

    def queue_and_emit():
        queue = asyncio.Queue()
        dispatch.bind(asyncio.get_running_loop())
        return queue, lambda event: dispatch.put(queue, event)

    # ---------------------------------------------------------------- routes
    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [{"id": m.name, "object": "model", "created": m.created,
                                            "owned_by": "vlmkit", "kind": m.kind} for m in models]}  # fmt: skip

    @app.get("/v1/models/{name}")
    async def get_model(name: str):
        m = by_name.get(name)
        if m is None:
            raise APIError(404, f"the model '{name}' does not exist", "model", "model_not_found")
        return {"id": m.name, "object": "model", "created": m.created, "owned_by": "vlmkit", "kind": m.kind}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = parse_chat(await read_json(request))
        m = served(req.model, "chat")
        if m.pipeline.family == "coca" and len(req.images) != 1:
            raise bad(f"'{m.name}' is a CoCa model: it reads one image per conversation, not {len(req.images)}",
                      "messages", "wrong_image_count")  # fmt: skip
        pixels = await run_in_threadpool(images_of, req.images, m)
        prompt_ids = await run_in_threadpool(m.pipeline.chat_prompt_ids, req.conversation)
        context = m.batcher.max_len
        if len(prompt_ids) >= context:
            raise bad(f"This model's maximum context length is {context} tokens; the messages hold "
                      f"{len(prompt_ids)} (image tokens included)", "messages", "context_length_exceeded")  # fmt: skip
        max_tokens = req.max_tokens or context - len(prompt_ids)
        if len(prompt_ids) + max_tokens > context:
            raise bad(f"This model's maximum context length is {context} tokens; you asked for "
                      f"{len(prompt_ids) + max_tokens} ({len(prompt_ids)} in the messages, {max_tokens} in the "
                      "completion): lower max_tokens", "max_tokens", "context_length_exceeded")  # fmt: skip
        queue, emit = queue_and_emit()
        params = SamplingParams(max_tokens, req.temperature, req.top_p, req.seed, req.stop, req.ignore_eos)
        job = GenerationRequest(prompt_ids, pixels, params, emit)
        await submit(m.batcher, job)
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": cid, "created": created, "model": m.name, "system_fingerprint": None}
        if req.stream:
            return StreamingResponse(_stream(job, queue, head, req.include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip
        text, finish = [], None
        try:
            while finish is None:
                try:
                    event = await asyncio.wait_for(queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return JSONResponse({}, status_code=499)
                    continue
                if event["type"] == "delta":
                    text.append(event["text"])
                elif event["type"] == "error":
                    raise APIError(500, event["message"])
                else:
                    finish = event
        finally:
            job.cancel()  # harmless when finished; frees the slot when the client went away
        return {**head, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                             "logprobs": None, "finish_reason": finish["reason"]}],
                "usage": finish["usage"]}  # fmt: skip

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        model, items, fmt = parse_embedding_inputs(await read_json(request))
        m = served(model, "embedding")
        texts = [x for kind, x in items if kind == "text"]
        pixels = await run_in_threadpool(images_of, [x for kind, x in items if kind == "image"], m)
        result = await embed(m, texts, pixels)
        vectors = {"text": iter(result["text"] if texts else ()),
                   "image": iter(result["image"] if pixels is not None else ())}  # fmt: skip
        data = []
        for i, (kind, _) in enumerate(items):
            vec = next(vectors[kind]).numpy().astype(np.float32)
            value = base64.b64encode(vec.tobytes()).decode() if fmt == "base64" else vec.tolist()
            data.append({"object": "embedding", "index": i, "embedding": value})
        tokens = sum(len(m.tokenizer.encode(t)) for t in texts)
        return {"object": "list", "data": data, "model": m.name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}  # fmt: skip

    async def embed(m: ServedModel, texts: list[str], pixels) -> dict:
        queue, emit = queue_and_emit()
        await submit(m.batcher, EmbeddingRequest(texts, pixels, emit))
        event = await queue.get()
        if event["type"] == "error":
            raise APIError(500, event["message"])
        return event

    @app.post("/v1/classify")
    async def classify(request: Request):
        body = await read_json(request)
        if not isinstance(body, dict):
            raise bad("the request body must be a JSON object")
        m = served(body.get("model") or _default(models, "embedding"), "embedding")
        labels = body.get("labels")
        if not isinstance(labels, list) or not labels or not all(isinstance(x, str) and x for x in labels):
            raise bad("labels must be a non-empty list of strings", "labels")
        template = body.get("template", "a photo of a {}.")
        if not isinstance(template, str) or "{}" not in template:
            raise bad("template must be a string with {} where the label goes", "template")
        pixels = await run_in_threadpool(images_of, [(body.get("image"), "image")], m)
        result = await embed(m, [template.format(x) for x in labels], pixels)
        probs = label_probabilities(m.model, result["image"], result["text"])[0]
        order = probs.argsort(descending=True).tolist()
        return {"object": "classification", "model": m.name,
                "data": [{"label": labels[i], "score": float(probs[i])} for i in order]}  # fmt: skip

    @app.post("/v1/search")
    async def search_images(request: Request):
        body = await read_json(request)
        if search is None:
            raise APIError(
                404, "this server has no image index; start it with --index INDEX", None, "no_index"
            )
        if not isinstance(body, dict):
            raise bad("the request body must be a JSON object")
        m = search.model
        if body.get("model") not in (None, m.name):
            raise bad(f"the index was built with '{m.name}'; search with that model", "model")
        query = body.get("query")
        top_k = body.get("top_k", 10)
        if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= 1000:
            raise bad("top_k must be an integer in [1, 1000]", "top_k")
        if isinstance(query, str) and query:
            vec = (await embed(m, [query], None))["text"]
        elif isinstance(query, dict) and query.get("type") == "image_url":
            pixels = await run_in_threadpool(images_of, [(query.get("image_url"), "query.image_url")], m)
            vec = (await embed(m, [], pixels))["image"]
        else:
            raise bad("query must be a string or {'type': 'image_url', 'image_url': {'url': ...}}", "query")
        scores, ids = search.index.search(vec, top_k)
        return {"object": "list", "model": m.name,
                "data": [{"index": int(i), "path": search.index.paths[i], "score": float(s),
                          "url": f"/v1/index/images/{int(i)}"} for s, i in zip(scores[0], ids[0])]}  # fmt: skip

    @app.get("/v1/index/images/{i}")
    async def index_image(i: int):
        if search is None or not 0 <= i < len(search.index):
            raise APIError(404, f"no indexed image {i}", None, "not_found")
        return FileResponse(search.index.root / search.index.paths[i])

    @app.get("/")
    async def page():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


async def _stream(job: GenerationRequest, queue: asyncio.Queue, head: dict, include_usage: bool):
    """Server-sent events of a chat completion: chunks, the finish chunk, an optional usage chunk, [DONE]."""

    def chunk(delta: dict, finish=None, **extra) -> str:
        body = {**head, "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra}  # fmt: skip
        if include_usage:
            body.setdefault("usage", None)
        return f"data: {json.dumps(body)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            event = await queue.get()
            if event["type"] == "delta":
                yield chunk({"content": event["text"]})
            elif event["type"] == "error":
                err = APIError(500, event["message"]).body()
                yield f"data: {json.dumps(err)}\n\n"
                break
            else:
                yield chunk({}, event["reason"])
                if include_usage:
                    yield f"data: {json.dumps({**head, 'object': 'chat.completion.chunk', 'choices': [], 'usage': event['usage']})}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()  # a client that disconnected mid-stream frees its slot at the engine's next step


class _Dispatcher:
    """Events from the engine thread to the requests' asyncio queues, in one wake-up of the event loop for all
    the events of an engine step (one `call_soon_threadsafe` per request and token would cost a loop wake-up
    each, which with 8 streams slows the engine itself)."""

    def __init__(self):
        self.loop = None
        self.pending: list = []
        self.lock = threading.Lock()

    def bind(self, loop) -> None:
        self.loop = loop

    def put(self, queue: asyncio.Queue, event: dict) -> None:  # on the engine thread
        with self.lock:
            self.pending.append((queue, event))
            if len(self.pending) > 1:
                return  # a flush is already scheduled
        try:
            self.loop.call_soon_threadsafe(self._flush)
        except RuntimeError:  # the event loop has closed (shutting down): nobody is listening
            pass

    def _flush(self) -> None:  # on the event loop
        with self.lock:
            pending, self.pending = self.pending, []
        for queue, event in pending:
            queue.put_nowait(event)


@dataclass
class _Search:
    index: object  # vlmkit.inference.index.ImageIndex
    model: ServedModel


def _load_index(path, by_name: dict, index_model: str | None) -> _Search:
    from vlmkit.inference.index import ImageIndex

    index = ImageIndex.load(path)
    if index_model is None:
        built_with = Path(index.meta.get("model", "")).resolve().name
        candidates = [m for m in by_name.values() if m.kind == "embedding"]
        match = [m for m in candidates if m.name == built_with]
        if not match and len(candidates) != 1:
            raise ConfigError(f"{path} was built with {index.meta.get('model')!r}: serve that model too (or name "
                              "the one to search with: --index-model NAME)")  # fmt: skip
        model = (match or candidates)[0]
    else:
        model = by_name.get(index_model)
        if model is None or model.kind != "embedding":
            raise ConfigError(f"--index-model {index_model}: not a served dual encoder")
    return _Search(index, model)


def _default(models: list[ServedModel], kind: str) -> str:
    names = [m.name for m in models if m.kind == kind]
    if not names:
        raise bad(f"no {kind} model is served", "model")
    return names[0]


__all__ = ["ServedModel", "create_app", "load_served"]

"""The serving engine: continuous batching for generation, dynamic batching for embeddings, one thread.

    batcher = ContinuousBatcher(pipeline, num_slots=8)        # a LLaVA-style or CoCa VLMPipeline
    batcher.submit(GenerationRequest(prompt_ids, pixels, SamplingParams(max_tokens=32), emit=events.append))
    while batcher.has_work():
        batcher.step()                                         # step-driven: tests run it without threads

Generation is iteration-level (continuous) batching over `num_slots` slots of one `SlotKVCache`. Each step
first admits waiting requests into free slots (their prompts, image tokens spliced in for LLaVA or
cross-attended to for CoCa, run as one right-padded prefill that yields each one's first token), then decodes one token for every slot that was already running,
in one batched forward. A request leaves its slot when it ends (an end-of-turn token, a stop string,
`max_tokens`, the context) or is cancelled (a client that disconnected): the slot is free for the next step.
Waiting requests sit in a bounded queue; `submit` raises `Overloaded` when it is full (the server's 429).

Each request gets events through its `emit` callback, called on the engine thread:
`{"type": "delta", "text": str}` (new text: held back while it may be the start of a stop string or ends in
half a UTF-8 character), then one `{"type": "finish", "reason": "stop"|"length", "usage": {...}}`, or
`{"type": "error", "message": str}` when the model failed on it.

`Engine` runs the batchers of every served model on one background thread, the only thread that touches the
models; the web server submits from its event loop and gets events back with `loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from vlmkit.models.generation import filter_logits
from vlmkit.nn.kv_cache import SlotKVCache

log = logging.getLogger(__name__)


class Overloaded(Exception):
    """The waiting queue is full: try again later (HTTP 429)."""


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False  # run to max_tokens (vLLM's option; load tests use it for fixed lengths)


@dataclass
class GenerationRequest:
    prompt_ids: list[int]  # the rendered prompt, image placeholders expanded
    pixel_values: torch.Tensor | None  # (I, 3, S, S): one image per placeholder run, in order
    params: SamplingParams
    emit: Callable[[dict], None]
    cancelled: bool = False  # set from any thread; the engine frees the slot at its next step

    def cancel(self) -> None:
        self.cancelled = True


class _Running:
    """A request in a slot: its tokens so far and the text already sent."""

    def __init__(self, request: GenerationRequest, slot: int):
        self.request, self.slot = request, slot
        self.tokens: list[int] = []
        self.sent = ""
        seed = request.params.seed
        self.generator = torch.Generator().manual_seed(
            seed if seed is not None else int(torch.randint(2**62, ()))
        )


def _held_back(text: str, stops: list[str]) -> int:
    """How many characters at the end of `text` could be the start of a stop string."""
    keep = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), keep, -1):
            if text.endswith(s[:n]):
                keep = n
                break
    return keep


class ContinuousBatcher:
    """Iteration-level batching of a LLaVA-style `VLMPipeline` over slots (see the module docstring)."""

    def __init__(self, pipeline, num_slots: int = 8, max_len: int | None = None, max_waiting: int = 32,
                 prefill_threads: int | None = None):  # fmt: skip
        self.pipeline = pipeline
        self.family = pipeline.family  # "llava": image tokens in the prompt; "coca": cross-attention to them
        if self.family not in ("llava", "coca"):
            raise ValueError(f"continuous batching serves LLaVA-style and CoCa models, not {self.family}")
        # Prefill is compute-bound (whole prompts): it may use more torch threads than the overhead-bound
        # decoding steps, which leave a core to the HTTP side (`vlmkit serve --threads`).
        self.prefill_threads = prefill_threads
        self.model = pipeline.model
        self.lm = self.model.language_model if self.family == "llava" else self.model.decoder
        self.tokenizer = pipeline.tokenizer
        self.end_ids = set(pipeline.end_ids)
        self.max_len = max_len or self.lm.cfg.max_seq_len
        w = self.lm.embed_tokens.weight
        d = self.lm.cfg
        self.cache = SlotKVCache(d.layers, num_slots, d.kv_heads, d.head_dim, self.max_len, w.device, w.dtype)
        self.slots: list[_Running | None] = [None] * num_slots
        self.waiting: deque[GenerationRequest] = deque()
        self.max_waiting = max_waiting
        self._lock = threading.Lock()  # `submit` may come from another thread than `step`

    # ---------------------------------------------------------------- queue
    def submit(self, request: GenerationRequest) -> None:
        if len(request.prompt_ids) >= self.max_len:
            raise ValueError(
                f"the prompt has {len(request.prompt_ids)} tokens; the context holds {self.max_len}"
            )
        with self._lock:
            if len(self.waiting) >= self.max_waiting:
                raise Overloaded(f"{len(self.waiting)} requests are already waiting")
            self.waiting.append(request)

    @property
    def active(self) -> int:
        return sum(s is not None for s in self.slots)

    def has_work(self) -> bool:
        return bool(self.waiting) or self.active > 0

    # ---------------------------------------------------------------- one iteration
    @torch.inference_mode()
    def step(self) -> None:
        """Admit waiting requests into free slots (prefill), then decode one token for the others."""
        for run in self.slots:
            if run is not None and run.request.cancelled:
                self._leave(run)
        running = [s for s in self.slots if s is not None]
        self._admit()
        if running:
            try:
                self._decode(running)
            except Exception as e:  # the model failed: those requests get an error, the server goes on
                log.exception("decode step failed")
                for run in running:
                    self._fail(run, e)

    def _admit(self) -> None:
        free = [i for i, s in enumerate(self.slots) if s is None]
        new = []
        with self._lock:
            while free and self.waiting:
                request = self.waiting.popleft()
                if not request.cancelled:
                    new.append(_Running(request, free.pop(0)))
        if not new:
            return
        for run in new:
            self.slots[run.slot] = run
        decode_threads = torch.get_num_threads()
        if self.prefill_threads:
            torch.set_num_threads(self.prefill_threads)
        try:
            self._start_all(new)
        finally:
            torch.set_num_threads(decode_threads)

    def _start_all(self, new: list[_Running]) -> None:
        embeds, memories, ok = [], [], []
        with self.pipeline._autocast():
            for run in new:  # one request's bad input fails that request alone
                try:
                    x, memory = self._embed(run.request)
                    embeds.append(x)
                    memories.append(memory)
                    ok.append(run)
                except Exception as e:
                    self._fail(run, e)
        if not ok:
            return
        try:
            logits = self._prefill(ok, embeds, memories)
        except Exception as e:
            log.exception("prefill failed")
            for run in ok:
                self._fail(run, e)
            return
        self._sample_and_emit(ok, logits)

    def _embed(self, r: GenerationRequest) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The prompt's input embeddings (P, C): LLaVA with the image tokens spliced in; CoCa with the image
        tokens it cross-attends to, (N, C_enc)."""
        device = self.lm.embed_tokens.weight.device
        ids = torch.tensor([r.prompt_ids], device=device)
        pixels = r.pixel_values.to(device) if r.pixel_values is not None else None
        if self.family == "coca":
            if pixels is None or len(pixels) != 1:
                raise ValueError("a CoCa model reads one image per conversation")
            return self.lm.embed(ids)[0], self.model.image_tokens(pixels)[0]
        return self.model.embed_inputs(ids, pixels)[0], None

    def _prefill(self, runs: list[_Running], embeds: list[torch.Tensor], memories: list) -> torch.Tensor:
        """The new requests' prompts as one right-padded batch; next-token logits (B, V)."""
        lengths = [len(e) for e in embeds]
        with self.pipeline._autocast():
            x = torch.nn.utils.rnn.pad_sequence(embeds, batch_first=True)  # (B, P, C), right padded
            memory = torch.stack(memories) if memories[0] is not None else None  # (B, N, C_enc)
            self.cache.select([run.slot for run in runs], lengths, prefill=True)
            kwargs = {"encoder_states": memory} if memory is not None else {}
            hidden = self.lm(inputs_embeds=x, cache=self.cache, logits="none", **kwargs).hidden  # (B, P, C)
            last = hidden[torch.arange(len(runs)), torch.tensor(lengths) - 1]  # (B, C)
            return self.lm.lm_head(last).float()  # (B, V)

    def _decode(self, runs: list[_Running]) -> None:
        device = self.lm.embed_tokens.weight.device
        tokens = torch.tensor([[run.tokens[-1]] for run in runs], device=device)  # (B, 1)
        self.cache.select([run.slot for run in runs], [1] * len(runs))
        with self.pipeline._autocast():
            logits = self.lm(tokens, cache=self.cache, logits="last").logits[:, -1].float()  # (B, V)
        self._sample_and_emit(runs, logits)

    def _sample_and_emit(self, runs: list[_Running], logits: torch.Tensor) -> None:
        for run, row in zip(runs, logits.cpu(), strict=True):
            p = run.request.params
            if p.temperature == 0:
                token = int(row.argmax())
            else:
                scores = filter_logits(row[None], p.temperature, 0, p.top_p)
                token = int(torch.multinomial(scores.softmax(-1), 1, generator=run.generator))
            run.tokens.append(token)
            self._after_token(run, token)

    # ---------------------------------------------------------------- text, endings
    def _after_token(self, run: _Running, token: int) -> None:
        p = run.request.params
        if token in self.end_ids and not p.ignore_eos:
            return self._finish(run, "stop", run.tokens[:-1])
        text = self.tokenizer.decode(run.tokens)
        cut = min((i for i in (text.find(s) for s in p.stop) if i >= 0), default=-1)
        if cut >= 0:
            self._send(run, text[:cut])
            return self._finish(run, "stop")
        # the prompt and the tokens so far fill the context (the last token is fed at the next step)
        full = (
            len(run.tokens) >= p.max_tokens or len(run.request.prompt_ids) + len(run.tokens) >= self.max_len
        )
        if full:
            self._send(run, text)
            return self._finish(run, "length")
        if not text.endswith("\ufffd"):  # not in the middle of a UTF-8 character
            self._send(run, text[: len(text) - _held_back(text, p.stop)])

    def _send(self, run: _Running, text: str) -> None:
        if len(text) > len(run.sent) and text.startswith(run.sent):
            run.request.emit({"type": "delta", "text": text[len(run.sent) :]})
            run.sent = text

    def _finish(self, run: _Running, reason: str, tokens: list[int] | None = None) -> None:
        if tokens is not None:  # an end token: the text before it, all of it now
            self._send(run, self.tokenizer.decode(tokens))
        n = len(run.request.prompt_ids)
        usage = {
            "prompt_tokens": n,
            "completion_tokens": len(run.tokens),
            "total_tokens": n + len(run.tokens),
        }
        run.request.emit({"type": "finish", "reason": reason, "usage": usage})
        self._leave(run)

    def _fail(self, run: _Running, error: Exception) -> None:
        run.request.emit({"type": "error", "message": f"the model failed on this request: {error}"})
        self._leave(run)

    def _leave(self, run: _Running) -> None:
        if self.slots[run.slot] is run:
            self.slots[run.slot] = None
            self.cache.free(run.slot)


# -------------------------------------------------------------------- embeddings
@dataclass
class EmbeddingRequest:
    texts: list[str]  # embedded with the text tower
    images: torch.Tensor | None  # (N, 3, S, S) preprocessed, embedded with the image tower
    emit: Callable[[dict], None]  # {"type": "embeddings", "text": (n, D), "image": (N, D)} or an error
    created: float = field(default_factory=time.monotonic)
    cancelled: bool = False

    @property
    def size(self) -> int:
        return len(self.texts) + (0 if self.images is None else len(self.images))

    def cancel(self) -> None:
        self.cancelled = True


class EmbeddingBatcher:
    """Dynamic batching of embedding requests for a dual encoder: a batch runs when `max_batch` inputs are
    waiting or the oldest has waited `max_wait_s`, whichever comes first. Requests are never split."""

    def __init__(self, embed_texts, embed_images, max_batch: int = 32, max_wait_s: float = 0.005,
                 max_waiting: int = 256):  # fmt: skip
        self.embed_texts, self.embed_images = embed_texts, embed_images
        self.max_batch, self.max_wait_s, self.max_waiting = max_batch, max_wait_s, max_waiting
        self.waiting: deque[EmbeddingRequest] = deque()
        self._lock = threading.Lock()

    def submit(self, request: EmbeddingRequest) -> None:
        with self._lock:
            if len(self.waiting) >= self.max_waiting:
                raise Overloaded(f"{len(self.waiting)} embedding requests are already waiting")
            self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting)

    def wait_s(self, now: float | None = None) -> float:
        """Seconds until a batch is due (0: run now)."""
        with self._lock:
            if not self.waiting:
                return float("inf")
            if sum(r.size for r in self.waiting) >= self.max_batch:
                return 0.0
            return max(0.0, self.waiting[0].created + self.max_wait_s - (now or time.monotonic()))

    @torch.inference_mode()
    def step(self) -> int:
        """Run one batch (whole requests, up to `max_batch` inputs unless one request is larger); returns the
        number of requests answered."""
        batch, size = [], 0
        with self._lock:
            while self.waiting and (not batch or size + self.waiting[0].size <= self.max_batch):
                r = self.waiting.popleft()
                if not r.cancelled:
                    batch.append(r)
                    size += r.size
        if not batch:
            return 0
        try:
            texts = [t for r in batch for t in r.texts]
            images = [r.images for r in batch if r.images is not None and len(r.images)]
            text_emb = self.embed_texts(texts) if texts else None
            image_emb = self.embed_images(torch.cat(images)) if images else None
        except Exception as e:
            log.exception("embedding batch failed")
            for r in batch:
                r.emit({"type": "error", "message": f"the model failed on this request: {e}"})
            return len(batch)
        t = i = 0
        for r in batch:
            n_img = 0 if r.images is None else len(r.images)
            r.emit({"type": "embeddings", "text": text_emb[t : t + len(r.texts)] if r.texts else None,
                    "image": image_emb[i : i + n_img] if n_img else None})  # fmt: skip
            t, i = t + len(r.texts), i + n_img
        return len(batch)


# -------------------------------------------------------------------- the thread
class Engine:
    """One background thread stepping every batcher; `submit(batcher, request)` from any thread."""

    def __init__(self, batchers: list):
        self.batchers = batchers
        self._wake = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="vlmkit-engine", daemon=True)

    def start(self) -> Engine:
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        self._thread.join(timeout=10)

    def submit(self, batcher, request) -> None:
        batcher.submit(request)  # Overloaded / ValueError go back to the caller
        with self._wake:
            self._wake.notify()

    def _timeout(self) -> float | None:
        """How long the thread may sleep: not at all while a generation runs or a batch is due."""
        waits = []
        for b in self.batchers:
            if isinstance(b, ContinuousBatcher) and b.has_work():
                return 0.0
            if isinstance(b, EmbeddingBatcher):
                waits.append(b.wait_s())
        wait = min(waits, default=float("inf"))
        return None if wait == float("inf") else wait

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._wake:
                timeout = self._timeout()
                if not self._stop and timeout != 0.0:
                    self._wake.wait(timeout)
                if self._stop:
                    return
            for b in self.batchers:
                try:
                    if isinstance(b, EmbeddingBatcher):
                        if b.wait_s() == 0.0:
                            b.step()
                    elif b.has_work():
                        b.step()
                except Exception:  # a bug in a batcher must not kill the thread that serves every model
                    log.exception("engine step failed")

"""Text generation for decoder LMs: greedy, sampling (temperature, top-k, top-p) and beam search.

    ids = generate(model, input_ids, attention_mask, config=GenerationConfig(max_new_tokens=32, eos_token_id=2))

The prompt runs through the model once (the prefill, logits for the last position only); then each
step feeds one token per row through the model's `KVCache`. `use_cache=False` instead recomputes the
whole sequence every step: the reference the cache is tested against, and the benchmark's baseline.

A "model" is anything with the vlmkit `Decoder`'s `forward(input_ids=None, *, inputs_embeds=None,
attention_mask=None, cache=None, logits="last", **model_kwargs) -> output with .logits`,
`embed(ids)` and `new_cache(batch_size, max_len, device=...)`: the Decoder itself, or a wrapper
(LLaVA passes the prompt as `inputs_embeds` with the image features spliced in; the tokens it then
generates go in as ids).

Batches follow Hugging Face's conventions: prompts are padded on the LEFT, `attention_mask` (B, T) marks
real tokens with 1, and position ids are `attention_mask.cumsum(-1) - 1` (the model computes them).
A row that emits an end token (or whose decoded new text contains a stop string) is finished; it then
emits `pad_token_id`. Generation ends when every row has finished or after `max_new_tokens`. The result
holds the new tokens only: (B, N), N <= max_new_tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from vlmkit.errors import ConfigError


@dataclass
class GenerationConfig:
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    num_beams: int = 1
    length_penalty: float = 1.0  # beam search: a hypothesis scores sum(log p) / length**length_penalty
    eos_token_id: int | list[int] | None = None  # None: no end token, every row runs to max_new_tokens
    pad_token_id: int | None = None  # what finished rows emit; None = the (first) end token
    stop_strings: list[str] = field(default_factory=list)  # needs `tokenizer`
    seed: int | None = None  # sampling: a torch.Generator seeded with this makes results reproducible
    suppress_tokens: list[int] = field(default_factory=list)  # never generated (e.g. an image placeholder)
    use_cache: bool = True  # False recomputes the whole prefix each step (reference / benchmark)

    def __post_init__(self):
        _check_config(self)

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.eos_token_id
        return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def _check_config(c: GenerationConfig) -> None:
    """One-line ConfigErrors for values generate cannot use (run again by generate: configs are mutable)."""
    if not isinstance(c.max_new_tokens, int) or c.max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens must be an integer >= 0, got {c.max_new_tokens!r}")
    if c.do_sample and not c.temperature > 0:
        raise ConfigError(f"temperature must be > 0 (use do_sample=False for greedy), got {c.temperature!r}")
    if not isinstance(c.top_k, int) or c.top_k < 0:
        raise ConfigError(f"top_k must be an integer >= 0 (0 = off), got {c.top_k!r}")
    if not 0 < c.top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1] (1 = off), got {c.top_p!r}")
    if not isinstance(c.num_beams, int) or c.num_beams < 1:
        raise ConfigError(f"num_beams must be an integer >= 1, got {c.num_beams!r}")
    if c.num_beams > 1 and c.do_sample:
        raise ConfigError(
            "beam sampling (num_beams > 1 with do_sample=True) is not supported; use one of them"
        )
    eos = c.eos_token_id
    ids = [eos] if isinstance(eos, int) else eos if isinstance(eos, (list, tuple)) else None
    if eos is not None and (ids is None or not all(isinstance(i, int) and i >= 0 for i in ids)):
        raise ConfigError(f"eos_token_id must be a token id or a list of ids, got {eos!r}")
    if c.pad_token_id is not None and not (isinstance(c.pad_token_id, int) and c.pad_token_id >= 0):
        raise ConfigError(f"pad_token_id must be a token id, got {c.pad_token_id!r}")
    if isinstance(c.stop_strings, str) or not all(isinstance(s, str) and s for s in c.stop_strings):
        raise ConfigError(f"stop_strings must be a list of non-empty strings, got {c.stop_strings!r}")


def filter_logits(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> torch.Tensor:
    """Sampling scores (..., V) from logits, in Hugging Face's order: divide by `temperature`, keep the
    `top_k` largest (ties with the k-th kept too), then the smallest set whose probability reaches `top_p`
    (at least one token). Removed tokens get -inf; `softmax` of the result is the sampling distribution."""
    scores = logits / temperature if temperature != 1.0 else logits
    if top_k > 0 and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]  # (..., 1)
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        # Ascending sort: a token goes when the tokens up to and including it hold at most 1 - top_p of the
        # mass; the most likely token always stays.
        sorted_scores, order = torch.sort(scores, dim=-1)
        remove = sorted_scores.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p  # (..., V)
        remove[..., -1] = False
        scores = scores.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return scores


def trim_stop_strings(text: str, stop_strings: Sequence[str]) -> str:
    """`text` up to (not including) the first occurrence of any stop string; unchanged without one."""
    cut = min((i for i in (text.find(s) for s in stop_strings) if i >= 0), default=len(text))
    return text[:cut]


class TextStreamer:
    """Streams row 0 of a generation as text: `on_text(piece)` with each newly completed piece.

    Pass as `generate(..., streamer=TextStreamer(tokenizer, on_text=...))`. Each step re-decodes the row's
    tokens and emits what was not emitted yet, holding text back while it ends in an incomplete UTF-8
    character (a byte-level token can carry part of one). The pieces joined equal
    `tokenizer.decode(result[0])`. The default `on_text` prints without newlines (one at the end).
    """

    def __init__(self, tokenizer, on_text: Callable[[str], None] | None = None):
        self.tokenizer = tokenizer
        self.on_text = on_text
        self._ids: list[int] = []
        self._text = ""

    def _emit(self, text: str) -> None:
        if len(text) > len(self._text) and text.startswith(self._text):
            piece, self._text = text[len(self._text) :], text
            if self.on_text is None:
                print(piece, end="", flush=True)
            else:
                self.on_text(piece)

    def put(self, tokens: torch.Tensor) -> None:
        """`tokens` (B,): this step's token of every row; row 0 is streamed."""
        self._ids.append(int(tokens[0]))
        text = self.tokenizer.decode(self._ids)
        if not text.endswith("\ufffd"):  # the replacement character: a UTF-8 sequence still incomplete
            self._emit(text)

    def end(self) -> None:
        """Flush what is left and reset for the next generation."""
        self._emit(self.tokenizer.decode(self._ids))
        if self.on_text is None:
            print(flush=True)
        self._ids, self._text = [], ""


class _Model:
    """The forward calls generate makes: prompt once, then one step at a time, with or without a cache."""

    def __init__(
        self, model, prompt_ids, prompt_embeds, mask, max_new: int, use_cache: bool, kwargs: dict, suppress=()
    ):
        self.model, self.kwargs, self.use_cache = model, kwargs, use_cache
        self.suppress = torch.tensor(list(suppress), dtype=torch.long) if suppress else None
        self.prompt_ids, self.prompt_embeds = prompt_ids, prompt_embeds
        prompt = prompt_ids if prompt_ids is not None else prompt_embeds
        B, T = prompt.shape[:2]
        self.T = T
        # Left-padded batch: the mask grows by one real column per step. Preallocated so each step passes
        # a view (the model reads the mask over cached + new positions). Unpadded: None, the fast path.
        self.mask = None
        if mask is not None:
            self.mask = torch.ones(B, T + max_new, dtype=mask.dtype, device=mask.device)  # (B, T+N)
            self.mask[:, :T] = mask
        self.cache = model.new_cache(B, T + max_new, device=prompt.device) if use_cache else None

    def _logits(self, mask_len: int, **inputs) -> torch.Tensor:
        mask = self.mask[:, :mask_len] if self.mask is not None else None
        out = self.model(**inputs, attention_mask=mask, cache=self.cache, logits="last", **self.kwargs)
        logits = out.logits[:, -1]  # (B, V)
        if self.suppress is not None:
            logits = logits.index_fill(-1, self.suppress.to(logits.device), float("-inf"))
        return logits

    def prefill(self) -> torch.Tensor:
        if self.prompt_ids is not None:
            return self._logits(self.T, input_ids=self.prompt_ids)
        return self._logits(self.T, inputs_embeds=self.prompt_embeds)

    def step(self, tokens: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
        """Next-token logits (B, V) after `tokens` (B,), the last column of `generated` (B, t)."""
        t = generated.shape[1]
        if self.use_cache:
            return self._logits(self.T + t, input_ids=tokens[:, None])
        # Recompute: prompt + everything generated, from scratch.
        if self.prompt_ids is not None:
            return self._logits(self.T + t, input_ids=torch.cat([self.prompt_ids, generated], dim=1))
        embeds = torch.cat(
            [self.prompt_embeds, self.model.embed(generated).to(self.prompt_embeds.dtype)], dim=1
        )
        return self._logits(self.T + t, inputs_embeds=embeds)

    def reorder(self, index: torch.Tensor) -> None:
        """Beam search: row i continues from row index[i]."""
        if self.cache is not None:
            self.cache.reorder(index)


@torch.inference_mode()
def generate(
    model,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    inputs_embeds: torch.Tensor | None = None,
    config: GenerationConfig | None = None,
    tokenizer=None,
    streamer=None,
    **model_kwargs,
) -> torch.Tensor:
    """Generate up to `config.max_new_tokens` tokens after each prompt row.

    The prompt is `input_ids` (B, T) or `inputs_embeds` (B, T, C), left-padded with `attention_mask` (B, T)
    (1 = real token; None = all real). `tokenizer` (with `decode(ids) -> str`) is needed for
    `stop_strings`; `streamer` gets `put(tokens (B,))` after every step and `end()` at the end (not with
    beam search). `model_kwargs` go to every forward call (e.g. `encoder_states` for CoCa); with beam
    search their tensors are repeated per beam along dim 0.

    Beam search (`num_beams > 1`) is Hugging Face's (transformers 5) with its default
    `early_stopping=False`: a row stops when no running beam can beat its worst kept finished hypothesis
    (scored sum(log p) / new_length**length_penalty), and the best finished hypothesis is returned.

    Returns LongTensor (B, N) of new tokens only; a row that finished early is padded with
    `pad_token_id` (the first end token when None).
    """
    config = config if config is not None else GenerationConfig()
    _check_config(config)
    if (input_ids is None) == (inputs_embeds is None):
        raise ConfigError("generate takes the prompt as input_ids or as inputs_embeds (exactly one)")
    prompt = input_ids if input_ids is not None else inputs_embeds
    if prompt.dim() != (2 if input_ids is not None else 3) or prompt.shape[1] == 0:
        want = "input_ids (B, T)" if input_ids is not None else "inputs_embeds (B, T, C)"
        raise ConfigError(f"{want} with T >= 1 expected, got shape {tuple(prompt.shape)}")
    B, T = prompt.shape[:2]
    if attention_mask is not None:
        if tuple(attention_mask.shape) != (B, T):
            raise ConfigError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, the prompt ({B}, {T})"
            )
        if not bool(attention_mask[:, -1].all()):
            raise ConfigError(
                "attention_mask: prompts must be padded on the left for generation (a row ends in padding)"
            )
        if bool(attention_mask.all()):
            attention_mask = None  # no padding: the model's faster unmasked path
    if config.stop_strings and tokenizer is None:
        raise ConfigError("stop_strings need a tokenizer: pass generate(..., tokenizer=...)")
    if config.num_beams > 1 and streamer is not None:
        raise ConfigError(
            "streaming is not supported with beam search (the best beam is known only at the end)"
        )
    eos = config.eos_token_ids
    pad = config.pad_token_id if config.pad_token_id is not None else eos[0] if eos else None
    if pad is None and config.stop_strings:
        raise ConfigError("stop_strings need a pad_token_id (or an eos_token_id) for the rows they finish")
    pad = 0 if pad is None else pad  # never emitted: without end tokens or stop strings no row finishes early
    if config.max_new_tokens == 0:
        return torch.empty(B, 0, dtype=torch.long, device=prompt.device)
    stop = _StopStrings(tokenizer, config.stop_strings) if config.stop_strings else None
    eos_ids = torch.tensor(eos, device=prompt.device) if eos else None
    if config.num_beams > 1:
        return _beam_search(
            model, input_ids, inputs_embeds, attention_mask, config, eos_ids, pad, stop, model_kwargs
        )
    runner = _Model(
        model, input_ids, inputs_embeds, attention_mask, config.max_new_tokens, config.use_cache, model_kwargs,
        config.suppress_tokens,
    )  # fmt: skip
    return _decode(runner, B, prompt.device, config, eos_ids, pad, stop, streamer)


class _StopStrings:
    """Which sequences' decoded new text contains a stop string."""

    def __init__(self, tokenizer, stop_strings: list[str]):
        self.tokenizer, self.stop_strings = tokenizer, stop_strings

    def __call__(self, tokens: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """tokens (R, t) new tokens; rows (R,) bool: which to check. Returns (R,) bool."""
        hit = torch.zeros_like(rows)
        for r in rows.nonzero().flatten().tolist():
            text = self.tokenizer.decode(tokens[r].tolist())
            hit[r] = any(s in text for s in self.stop_strings)
        return hit


def _decode(runner: _Model, B: int, device, config, eos_ids, pad: int, stop, streamer) -> torch.Tensor:
    """Greedy or sampled decoding, one token per row per step."""
    N = config.max_new_tokens
    out = torch.full((B, N), pad, dtype=torch.long, device=device)  # (B, N)
    unfinished = torch.ones(B, dtype=torch.bool, device=device)  # (B,)
    can_finish = eos_ids is not None or stop is not None
    gen = None
    if config.do_sample and config.seed is not None:
        gen = torch.Generator(device=device).manual_seed(config.seed)
    logits = runner.prefill()  # (B, V)
    n = N
    for t in range(N):
        if config.do_sample:
            scores = filter_logits(logits.float(), config.temperature, config.top_k, config.top_p)
            tokens = torch.multinomial(scores.softmax(dim=-1), 1, generator=gen).squeeze(1)  # (B,)
        else:
            tokens = logits.argmax(dim=-1)  # (B,); the first of equal maxima, as HF
        if can_finish:
            tokens = torch.where(unfinished, tokens, pad)
        out[:, t] = tokens
        if streamer is not None:
            streamer.put(tokens)
        if can_finish:
            if eos_ids is not None:
                unfinished &= ~torch.isin(tokens, eos_ids)
            if stop is not None:
                unfinished &= ~stop(out[:, : t + 1], unfinished)
            if not bool(unfinished.any()):
                n = t + 1
                break
        if t + 1 < N:
            logits = runner.step(tokens, out[:, : t + 1])
    if streamer is not None:
        streamer.end()
    return out[:, :n]


def _beam_search(
    model, input_ids, inputs_embeds, mask, config, eos_ids, pad: int, stop, model_kwargs
) -> torch.Tensor:
    """Hugging Face's vectorised beam search (transformers 5 `_beam_search`, early_stopping=False).

    Each step keeps the K = max(2, 1 + #eos) * nb best continuations of all beams of a row (so nb of them
    can go on when some end), moves those that end among the first nb into the finished set (best nb
    kept by length-penalised score), and continues with the nb best that did not end.
    """
    nb, N, lp = config.num_beams, config.max_new_tokens, config.length_penalty
    prompt = input_ids if input_ids is not None else inputs_embeds
    B, device = prompt.shape[0], prompt.device

    def per_beam(x):  # (B, ...) -> (B*nb, ...), each row's beams adjacent
        return x.repeat_interleave(nb, dim=0) if torch.is_tensor(x) else x

    kwargs = {k: per_beam(v) for k, v in model_kwargs.items()}
    runner = _Model(
        model, per_beam(input_ids), per_beam(inputs_embeds), per_beam(mask), N, config.use_cache, kwargs,
        config.suppress_tokens,
    )  # fmt: skip
    K = max(2, 1 + (0 if eos_ids is None else len(eos_ids))) * nb
    top_nb = torch.arange(K, device=device) < nb  # (K,)
    neg = -1.0e9  # HF's "impossible" score
    running = torch.full((B, nb, N), pad, dtype=torch.long, device=device)  # running beams' new tokens
    running_scores = torch.zeros(B, nb, device=device)  # sum of log p
    running_scores[:, 1:] = neg  # all beams start equal: only beam 0 may expand at the first step
    finished = running.clone()  # (B, nb, N) best finished hypotheses
    finished_scores = torch.full((B, nb), neg, device=device)
    finished_len = torch.zeros(B, nb, dtype=torch.long, device=device)
    is_finished = torch.zeros(B, nb, dtype=torch.bool, device=device)
    improvable = torch.ones(B, 1, dtype=torch.bool, device=device)  # can a running beam still beat them?
    batch_offset = torch.arange(B, device=device)[:, None] * nb  # (B, 1)
    logits = runner.prefill()  # (B*nb, V)
    for t in range(N):
        log_probs = F.log_softmax(logits.float(), dim=-1)  # (B*nb, V)
        V = log_probs.shape[-1]
        log_probs = (log_probs.view(B, nb, V) + running_scores[:, :, None]).view(B, nb * V)
        topk_scores, topk_index = torch.topk(log_probs, K)  # (B, K)
        source = topk_index // V  # (B, K) beam each candidate extends
        tokens = topk_index % V  # (B, K)
        candidates = running.gather(1, source[:, :, None].expand(B, K, N)).clone()  # (B, K, N)
        candidates[:, :, t] = tokens
        # Which candidates end here: an end token, the length limit, or a stop string.
        if t == N - 1:
            ends = torch.ones(B, K, dtype=torch.bool, device=device)
        else:
            ends = (
                torch.isin(tokens, eos_ids) if eos_ids is not None else torch.zeros_like(top_nb).expand(B, K)
            )
            if stop is not None:
                ends = ends | stop(candidates[:, :, : t + 1].reshape(B * K, t + 1), ~ends.flatten()).view(
                    B, K
                )
        # The nb best candidates that go on.
        go_on_scores = topk_scores + ends.float() * neg
        keep = torch.topk(go_on_scores, nb).indices  # (B, nb)
        running = candidates.gather(1, keep[:, :, None].expand(B, nb, N))
        running_scores = go_on_scores.gather(1, keep)
        beam_source = source.gather(1, keep)  # (B, nb)
        # Candidates among the first nb that end join the finished set if they score high enough.
        just_finished = ends & top_nb  # (B, K)
        scores = topk_scores / ((t + 1) ** lp)
        scores = scores + (~improvable).float() * neg + (~just_finished).float() * neg
        merged_scores = torch.cat([finished_scores, scores], dim=1)  # (B, nb + K)
        best = torch.topk(merged_scores, nb).indices  # (B, nb)
        finished = torch.cat([finished, candidates], dim=1).gather(1, best[:, :, None].expand(B, nb, N))
        finished_scores = merged_scores.gather(1, best)
        new_len = torch.full((B, K), t + 1, dtype=torch.long, device=device)
        finished_len = torch.cat([finished_len, new_len], dim=1).gather(1, best)
        is_finished = torch.cat([is_finished, just_finished], dim=1).gather(1, best)
        # HF's early-stop heuristic: the best running beam, scored at its current length, cannot beat the
        # worst finished hypothesis once all nb slots are full.
        best_running = running_scores[:, :1] / ((t + 1) ** lp)  # (B, 1)
        worst = torch.where(is_finished, finished_scores.min(dim=1, keepdim=True).values, neg)  # (B, nb)
        improvable = improvable & (best_running > worst).any(dim=1, keepdim=True)
        if t + 1 == N or not bool(improvable.any()) or bool(ends.all()):
            break
        runner.reorder((beam_source + batch_offset).flatten())
        logits = runner.step(running[:, :, t].flatten(), running[:, :, : t + 1].reshape(B * nb, t + 1))
    length = int(finished_len[:, 0].max())
    return finished[:, 0, :length]

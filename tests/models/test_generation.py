"""Generation: KV cache == recompute, beam 1 == greedy, parity with transformers' generate on the same weights,
sampling filters against a hand-computed distribution, stop strings, streaming."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from vlmkit.data.tokenizer import Tokenizer
from vlmkit.errors import ConfigError
from vlmkit.models.decoder import Decoder, DecoderConfig
from vlmkit.models.generation import (
    GenerationConfig,
    TextStreamer,
    filter_logits,
    generate,
    trim_stop_strings,
)
from vlmkit.nn.kv_cache import KVCache

PAD = 3  # not 0: transformers' beam search fills with `pad or eos`, which turns pad 0 into eos


def tiny_decoder(seed: int = 0, **overrides) -> Decoder:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=97, width=64, layers=2, heads=4, kv_heads=2, max_seq_len=128) | overrides
    model = Decoder(DecoderConfig(**cfg)).eval()
    with torch.no_grad():  # larger weights than the 0.02 init: sharper, less repetitive generations
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15)
    return model


def left_padded(lengths: list[int], vocab: int = 97, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts of the given lengths, left-padded with PAD: input_ids and attention_mask (B, T)."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.full((len(lengths), T), PAD, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, T - n :] = torch.randint(4, vocab, (n,), generator=g)
        mask[row, T - n :] = 1
    return ids, mask


@pytest.fixture(scope="module")
def model() -> Decoder:
    return tiny_decoder()


@pytest.fixture(scope="module")
def prompts():
    return left_padded([5, 9, 2])


@pytest.fixture(scope="module")
def eos(model, prompts) -> int:
    """An end token the model actually emits mid-way in one row, so some rows finish early."""
    ids, mask = prompts
    out = generate(model, ids, mask, config=GenerationConfig(max_new_tokens=12))
    assert out.shape == (3, 12)
    return int(out[1, 6])


def ends_with_padding(out: torch.Tensor, eos: int) -> bool:
    """Every row that emits eos emits only PAD after it (and at least one row does)."""
    found = False
    for row in out.tolist():
        if eos in row:
            found = True
            assert all(t == PAD for t in row[row.index(eos) + 1 :])
    return found


def test_cache_matches_recompute_and_single_rows(model, prompts, eos):
    ids, mask = prompts
    cfg = GenerationConfig(max_new_tokens=16, eos_token_id=eos, pad_token_id=PAD)
    cached = generate(model, ids, mask, config=cfg)
    recomputed = generate(model, ids, mask, config=GenerationConfig(**{**vars(cfg), "use_cache": False}))
    assert torch.equal(cached, recomputed)
    assert ends_with_padding(cached, eos)
    for row in range(ids.shape[0]):  # each row alone, without padding
        alone = generate(model, ids[row : row + 1, mask[row].bool()], config=cfg)[0]
        n = alone.shape[0]
        assert torch.equal(cached[row, :n], alone)
        assert (cached[row, n:] == PAD).all()


def test_inputs_embeds_prompt_matches_ids(model, prompts, eos):
    ids, mask = prompts
    for use_cache in (True, False):
        cfg = GenerationConfig(max_new_tokens=10, eos_token_id=eos, pad_token_id=PAD, use_cache=use_cache)
        with torch.no_grad():
            embeds = model.embed(ids)
        assert torch.equal(
            generate(model, inputs_embeds=embeds, attention_mask=mask, config=cfg),
            generate(model, ids, mask, config=cfg),
        )


def test_beam_width_one_is_greedy(model, prompts, eos):
    ids, mask = prompts
    cfg = GenerationConfig(max_new_tokens=12, eos_token_id=eos, pad_token_id=PAD)
    beam1 = GenerationConfig(**{**vars(cfg), "num_beams": 1, "length_penalty": 0.5})
    assert torch.equal(generate(model, ids, mask, config=beam1), generate(model, ids, mask, config=cfg))


def test_beam_search_cache_matches_recompute_with_cross_attention():
    model = tiny_decoder(seed=2, cross_attention_start=1, encoder_width=32)
    ids, mask = left_padded([4, 7], seed=3)
    states = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(4))
    outs = [
        generate(
            model,
            ids,
            mask,
            encoder_states=states,
            config=GenerationConfig(max_new_tokens=10, num_beams=3, use_cache=c),
        )
        for c in (True, False)
    ]
    assert outs[0].shape == (2, 10)
    assert torch.equal(outs[0], outs[1])


def test_matches_transformers_greedy_and_beam(eos):
    transformers = pytest.importorskip("transformers")
    from vlmkit.convert.llama import decoder_config_from_hf, decoder_state_from_hf

    hf_cfg = transformers.LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=eos, pad_token_id=PAD,
    )  # fmt: skip
    torch.manual_seed(5)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15)
    ours = Decoder(decoder_config_from_hf(hf_cfg.to_dict())).eval()
    ours.load_state_dict(decoder_state_from_hf(hf.state_dict(), "model."))
    ids, mask = left_padded([6, 9, 3], seed=6)
    for num_beams in (1, 3):
        # An end token this search emits mid-way, so finishing and padding are compared too.
        end = int(
            generate(ours, ids, mask, config=GenerationConfig(max_new_tokens=12, num_beams=num_beams))[0, 5]
        )
        cfg = GenerationConfig(max_new_tokens=12, num_beams=num_beams, eos_token_id=end, pad_token_id=PAD)
        got = generate(ours, ids, mask, config=cfg)
        want = hf.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, num_beams=num_beams,
            eos_token_id=end, pad_token_id=PAD, min_length=0, repetition_penalty=1.0, length_penalty=1.0,
        )[:, ids.shape[1] :]  # fmt: skip
        assert torch.equal(got, want), (num_beams, got, want)
        assert (got == end).any()


def test_sampling_is_seeded_and_top_k_one_is_greedy(model, prompts, eos):
    ids, mask = prompts
    sample = dict(max_new_tokens=12, eos_token_id=eos, pad_token_id=PAD, do_sample=True, temperature=1.5)
    a = generate(model, ids, mask, config=GenerationConfig(**sample, seed=7))
    b = generate(model, ids, mask, config=GenerationConfig(**sample, seed=7))
    c = generate(model, ids, mask, config=GenerationConfig(**sample, seed=8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy = generate(
        model, ids, mask, config=GenerationConfig(max_new_tokens=12, eos_token_id=eos, pad_token_id=PAD)
    )
    top1 = generate(model, ids, mask, config=GenerationConfig(**sample, top_k=1, seed=9))
    assert torch.equal(top1, greedy)


# Two equal logits (1.0): top-k keeps both when the k-th is one of them. No case puts the top-p cut between
# them (which of two equal tokens sorts first is unspecified).
TOY = [2.0, 1.0, 0.5, 0.0, -1.0, 3.0, 1.0]


def hand_distribution(logits: list[float], temperature: float, top_k: int, top_p: float) -> list[float]:
    """Sampling probabilities by hand, in float64: temperature, keep top k (ties included), keep the most
    likely tokens until their mass reaches top_p (the token that crosses it stays), renormalise."""
    scaled = [x / temperature for x in logits]
    kth = sorted(scaled, reverse=True)[top_k - 1] if top_k else -math.inf
    z = sum(math.exp(x) for x in scaled if x >= kth)
    p = [math.exp(x) / z if x >= kth else 0.0 for x in scaled]
    kept, mass = set(), 0.0
    for i in sorted(range(len(p)), key=lambda i: -p[i]):
        if mass < top_p and p[i] > 0:
            kept.add(i)
            mass += p[i]
    z = sum(p[i] for i in kept)
    return [p[i] / z if i in kept else 0.0 for i in range(len(p))]


@pytest.mark.parametrize(
    "temperature,top_k,top_p", [(0.7, 0, 1.0), (1.0, 3, 1.0), (1.3, 0, 0.8), (0.7, 5, 0.95)]
)
def test_filter_logits_matches_hand_computed_distribution(temperature, top_k, top_p):
    want = torch.tensor(hand_distribution(TOY, temperature, top_k, top_p), dtype=torch.float64)
    got = filter_logits(torch.tensor([TOY], dtype=torch.float64), temperature, top_k, top_p).softmax(-1)[0]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert (want == 0).sum() > 0 or (top_k == 0 and top_p == 1.0)


class Scripted:
    """A stand-in LM that emits `script[row, step]` at each step, whatever the prompt (one-hot logits,
    margin 10). It counts steps through the cache, or the sequence length without one."""

    def __init__(self, script: torch.Tensor, vocab: int, prompt_len: int, logits: torch.Tensor | None = None):
        self.script, self.vocab, self.prompt_len, self.fixed = script, vocab, prompt_len, logits

    def new_cache(self, batch_size: int, max_len: int, *, device=None, dtype=None) -> KVCache:
        return KVCache(1, batch_size, 1, 1, max_len, device=device, dtype=dtype)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*ids.shape, 4)

    def __call__(self, input_ids=None, *, inputs_embeds=None, attention_mask=None, cache=None, logits="all"):
        x = input_ids if input_ids is not None else inputs_embeds
        B, T = x.shape[:2]
        step = (cache.length if cache is not None else 0) + T - self.prompt_len
        if cache is not None:
            cache.advance(T)
        if self.fixed is not None:
            return SimpleNamespace(logits=self.fixed.expand(B, 1, -1))
        rows = self.script[:, min(step, self.script.shape[1] - 1)]
        rows = rows.repeat_interleave(B // rows.shape[0])  # beam search: each row's beams are adjacent
        return SimpleNamespace(logits=torch.nn.functional.one_hot(rows, self.vocab)[:, None].float() * 10)


def test_generate_samples_the_filtered_distribution():
    """Chi-square goodness of fit: 6000 rows each sample one token from the toy logits through generate."""
    scipy_stats = pytest.importorskip("scipy.stats")
    temperature, top_k, top_p = 1.3, 5, 0.9
    want = hand_distribution(TOY, temperature, top_k, top_p)
    n = 6000
    model = Scripted(None, len(TOY), 1, logits=torch.tensor(TOY)[None, None])
    cfg = GenerationConfig(
        max_new_tokens=1, do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p, seed=0
    )
    out = generate(model, torch.ones(n, 1, dtype=torch.long), config=cfg)[:, 0]
    counts = torch.bincount(out, minlength=len(TOY)).tolist()
    kept = [i for i, p in enumerate(want) if p > 0]
    assert all(counts[i] == 0 for i in range(len(TOY)) if i not in kept)  # filtered tokens never drawn
    chi2 = scipy_stats.chisquare([counts[i] for i in kept], [want[i] * n for i in kept])
    assert chi2.pvalue > 1e-3, (counts, want)


SENTENCES = [
    "a red circle is left of a blue square",
    "the green triangle is above the red circle",
    "two blue squares and one yellow star",
    "is there a purple circle? yes, there is",
] * 4


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train(SENTENCES, vocab_size=300, context_length=32)


def scripted(tokenizer: Tokenizer, texts: list[str], prompt_len: int = 2) -> tuple[Scripted, torch.Tensor]:
    """A model that spells out `texts` (one per row) then the end token, padded with pad tokens."""
    ids = tokenizer(texts)[:, 1:]  # drop the start token; each row ends with the end token, then padding
    return Scripted(ids, tokenizer.vocab_size, prompt_len), ids


def test_stop_strings(tokenizer):
    model, script = scripted(
        tokenizer, ["the blue square is above. the red circle", "two yellow stars and one circle"]
    )
    prompt = torch.ones(2, 2, dtype=torch.long)
    eot = tokenizer.eot_token_id
    cfg = GenerationConfig(max_new_tokens=20, eos_token_id=eot, pad_token_id=0, stop_strings=[". ", "red"])
    for num_beams in (1, 2):
        out = generate(
            model,
            prompt,
            config=GenerationConfig(**{**vars(cfg), "num_beams": num_beams}),
            tokenizer=tokenizer,
        )
        first = tokenizer.decode(out[0])
        # Row 0 stops at the first token whose text completes ". " (kept in the output, as transformers).
        n = next(i for i in range(1, 21) if ". " in tokenizer.decode(script[0, :i]))
        assert torch.equal(out[0, :n], script[0, :n]) and (out[0, n:] == 0).all()
        assert first.startswith("the blue square is above.") and "red" not in first
        assert trim_stop_strings(first + " x", [". ", "red"]) == "the blue square is above"
        # Row 1 never meets a stop string: it ends with its end token.
        assert tokenizer.decode(out[1]) == "two yellow stars and one circle" and eot in out[1].tolist()


class Recorder:
    def __init__(self):
        self.tokens, self.ended = [], 0

    def put(self, tokens: torch.Tensor) -> None:
        self.tokens.append(tokens.clone())

    def end(self) -> None:
        self.ended += 1


def test_streamer_gets_every_token_in_order(model, prompts, eos):
    ids, mask = prompts
    rec = Recorder()
    out = generate(
        model,
        ids,
        mask,
        config=GenerationConfig(max_new_tokens=16, eos_token_id=eos, pad_token_id=PAD),
        streamer=rec,
    )
    assert rec.ended == 1 and torch.equal(torch.stack(rec.tokens, dim=1), out)


def test_text_streamer_emits_complete_text(tokenizer):
    # Characters the small vocabulary lacks become byte tokens: a character spans several steps.
    text = "café ☕ is next to a red circle ü"
    model, _ = scripted(tokenizer, [text, "a blue square"])
    pieces: list[str] = []
    out = generate(
        model, torch.ones(2, 2, dtype=torch.long), config=GenerationConfig(max_new_tokens=30, eos_token_id=2, pad_token_id=0),
        streamer=TextStreamer(tokenizer, on_text=pieces.append),
    )  # fmt: skip
    assert "".join(pieces) == tokenizer.decode(out[0]) == text
    assert len(pieces) > 3 and not any("\ufffd" in p for p in pieces)


def test_trim_stop_strings():
    assert trim_stop_strings("yes.\nUSER: no", ["\nUSER:", "</s>"]) == "yes."
    assert trim_stop_strings("a</s>b\nUSER:", ["\nUSER:", "</s>"]) == "a"
    assert trim_stop_strings("plain", ["x"]) == "plain"


def test_errors(model, prompts):
    ids, mask = prompts
    with pytest.raises(ConfigError, match="tokenizer"):
        generate(model, ids, mask, config=GenerationConfig(eos_token_id=2, stop_strings=["."]))
    with pytest.raises(ConfigError, match="top_p"):
        GenerationConfig(do_sample=True, top_p=1.5)
    with pytest.raises(ConfigError, match="beam sampling"):
        GenerationConfig(do_sample=True, num_beams=2)
    with pytest.raises(ConfigError, match="left"):
        generate(model, ids, mask.flip(1))
    with pytest.raises(ConfigError, match="beam search"):
        generate(model, ids, mask, config=GenerationConfig(num_beams=2), streamer=Recorder())
    with pytest.raises(ConfigError, match="exactly one"):
        generate(model, ids, inputs_embeds=torch.zeros(3, 9, 64))
    assert generate(model, ids, mask, config=GenerationConfig(max_new_tokens=0)).shape == (3, 0)

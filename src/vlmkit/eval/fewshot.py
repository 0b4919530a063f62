"""Few-shot evaluation of Flamingo-style models: demonstrations in the prompt, then the query.

    <image>Output: dax<|endofchunk|><image>Output: wug<|endofchunk|> ... <image>Output:

Tasks (`vlmkit eval fewshot --task`):
- `classify`, novel labels: each episode of `val_episodes.jsonl` (vlmkit.data.fewshot) names two classes,
  a made-up word for each that training never saw, and a query image. The demonstrations are support images
  of the two classes with their words; the model scores both candidate answers (the sum of the log-
  probabilities of each word's tokens and the chunk end) and the higher one is its answer. Without shots
  nothing says which word is which: accuracy is chance (0.5).
- `caption`: support and queries are caption files; the query's caption is generated greedily up to
  `<|endofchunk|>`; CIDEr (vlmkit.eval.captioning) against the references.
- `vqa`: `Question: ... Short answer: ...`; exact-match accuracy of normalised answers (vlmkit.eval.vqa).

Demonstrations are chosen per query `random`ly (seeded by the query's index) or by similarity (`similar`,
RICES: the support images nearest the query in the model's own vision tower, cosine, the most similar
last, next to the query). Every number comes with a 95% bootstrap interval over queries.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vlmkit.data.fewshot import CAPTION_FORMAT, VQA_FORMAT
from vlmkit.data.interleaved import Document, encode_document
from vlmkit.data.transforms import ImageTransform, load_image
from vlmkit.errors import ConfigError, DataError

TASKS = ("classify", "caption", "vqa")
DEMOS = ("random", "similar")


def rices(query: torch.Tensor, support: torch.Tensor, k: int) -> list[int]:
    """The k support rows most similar to `query` (cosine), least similar first, most similar last."""
    if k == 0:
        return []
    sims = F.normalize(support.float(), dim=-1) @ F.normalize(query.float(), dim=-1)  # (N,)
    top = torch.topk(sims, k).indices  # most similar first
    return top.flip(0).tolist()


@dataclass
class Example:
    image: Path
    text: str  # the demonstration's text ("Output: a red circle")
    prompt: str  # what the query shows before the answer ("Output:")
    answer: str  # the answer alone


class FewShot:
    """A Flamingo model with its tokenizer and preprocessing, for prompts of demonstrations and a query."""

    def __init__(self, model, tokenizer, preprocess, device="cpu", batch_size: int = 16):
        if not hasattr(model, "gated_cross_attn_layers"):
            raise ConfigError(
                "vlmkit eval fewshot evaluates Flamingo-style models (family flamingo, Idefics)"
            )
        self.model, self.tokenizer, self.device = model.eval(), tokenizer, torch.device(device)
        self.transform = ImageTransform(preprocess)
        self.cfg = model.cfg
        self.batch_size = batch_size
        self._pixels: dict[Path, torch.Tensor] = {}
        self._features: dict[Path, torch.Tensor] = {}

    def pixels(self, paths: list[Path]) -> torch.Tensor:
        for p in paths:
            if p not in self._pixels:
                self._pixels[p] = self.transform(load_image(p))
        return torch.stack([self._pixels[p] for p in paths]) if paths else torch.empty(0)

    @torch.no_grad()
    def features(self, paths: list[Path]) -> torch.Tensor:
        """The vision tower's pooled features (N, D), for RICES."""
        todo = [p for p in dict.fromkeys(paths) if p not in self._features]
        for i in range(0, len(todo), 64):
            chunk = todo[i : i + 64]
            out = self.model.vision_model(self.pixels(chunk).to(self.device)).float().cpu()
            self._features.update(zip(chunk, out, strict=True))
        return torch.stack([self._features[p] for p in paths])

    def encode(self, demos: list[Example], query: Example, answer: str | None):
        """(ids, images) of the demonstrations and the query; with `answer` the query's chunk is closed."""
        segments = []
        for d in demos:
            segments += [("image", d.image), ("text", d.text)]
        text = query.prompt if answer is None else f"{query.prompt} {answer}"
        segments += [("image", query.image), ("text", text)]
        limit = self.cfg.decoder.max_seq_len
        enc = encode_document(
            Document(segments), self.tokenizer, self.cfg.image_token_id, self.cfg.chunk_token_id, None,
            close_last=answer is not None,
        )  # fmt: skip
        if len(enc.ids) > limit:
            raise DataError(
                f"a prompt of {len(demos)} shots is {len(enc.ids)} tokens, longer than the model's context of "
                f"{limit}; ask for fewer shots"
            )
        return enc.ids, enc.images

    @torch.no_grad()
    def score(self, demos: list[Example], query: Example, candidates: list[str]) -> list[float]:
        """Log-probability of each candidate answer (its tokens and the chunk end) after the prompt."""
        rows = [self.encode(demos, query, c) for c in candidates]
        ids = [r[0] for r in rows]
        start = len(self.encode(demos, query, None)[0])  # the prompt; each candidate's tokens follow it
        for c, x in zip(candidates, ids, strict=True):
            if len(x) <= start:
                raise DataError(f"the candidate answer {c!r} adds no token to the prompt")
        T = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), T), self.cfg.decoder.pad_token_id, dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, : len(x)] = torch.tensor(x)
        mask = (torch.arange(T)[None] < torch.tensor([len(x) for x in ids])[:, None]).long()
        pixels = self.pixels(rows[0][1])[None].expand(len(ids), -1, -1, -1, -1)
        logits = self.model(input_ids.to(self.device), pixels.to(self.device), mask.to(self.device)).logits
        logp = logits.float().log_softmax(-1).cpu()  # (C, T, V)
        return [float(sum(logp[i, t - 1, x[t]] for t in range(start, len(x)))) for i, x in enumerate(ids)]

    @torch.no_grad()
    def generate(self, prompts: list[tuple[list[Example], Example]], max_new_tokens: int = 24) -> list[str]:
        """Greedy answers after each prompt, batched (left padding); prompts in a batch share a shot count."""
        from vlmkit.models.generation import GenerationConfig

        d = self.cfg.decoder
        config = GenerationConfig(
            max_new_tokens=max_new_tokens, eos_token_id=[d.eos_token_id, self.cfg.chunk_token_id],
            pad_token_id=d.pad_token_id,
        )  # fmt: skip
        out = []
        for i in range(0, len(prompts), self.batch_size):
            batch = [self.encode(demos, query, None) for demos, query in prompts[i : i + self.batch_size]]
            T = max(len(ids) for ids, _ in batch)
            input_ids = torch.full((len(batch), T), d.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(batch), T), dtype=torch.long)
            for b, (ids, _) in enumerate(batch):
                input_ids[b, T - len(ids) :] = torch.tensor(ids)
                mask[b, T - len(ids) :] = 1
            pixels = torch.stack([self.pixels(images) for _, images in batch])  # (B, M, 3, S, S)
            new = self.model.generate(
                input_ids.to(self.device), pixels.to(self.device), mask.to(self.device), config=config
            )
            out += [self.tokenizer.decode(row.tolist()).strip() for row in new.cpu()]
        return out


def _bootstrap(values: np.ndarray, samples: int = 1000, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (samples, len(values)))].mean(axis=1)
    return {"value": float(values.mean()), "low": float(np.quantile(means, 0.025)),
            "high": float(np.quantile(means, 0.975))}  # fmt: skip


def _choose(fs: FewShot, pool: list[Example], query: Example, k: int, demos: str, rng) -> list[Example]:
    if k > len(pool):
        raise DataError(f"{k} shots asked but the support set has {len(pool)} examples; ask for fewer shots")
    if demos == "random":
        return [pool[i] for i in rng.choice(len(pool), size=k, replace=False)]
    feats = fs.features([e.image for e in pool])
    return [pool[i] for i in rices(fs.features([query.image])[0], feats, k)]


def _read(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                rows.append({**json.loads(line), "_root": path.parent})
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg})") from None
    if not rows:
        raise DataError(f"{path} has no rows")
    return rows


def evaluate_classify(fs: FewShot, episodes: str | Path, support: str | Path, shots: int, demos: str,
                      limit: int | None = None, seed: int = 0) -> dict:  # fmt: skip
    """Novel-label accuracy over the episodes (see the module docstring)."""
    by_class: dict[str, list[Path]] = {}
    for r in _read(support):
        by_class.setdefault(r["label"], []).append(r["_root"] / r["image"])
    correct = []
    for index, ep in enumerate(_read(episodes)[:limit]):
        words = dict(zip(ep["classes"], ep["words"], strict=True))
        missing = [c for c in ep["classes"] if c not in by_class]
        if missing:
            raise DataError(
                f"{episodes}: episode {ep['id']} names class {missing[0]!r}, which {support} lacks"
            )
        rng = np.random.default_rng([seed, index])
        pool = [
            Example(p, CAPTION_FORMAT.format(words[c]), "Output:", words[c])
            for c in ep["classes"]
            for p in by_class[c]
        ]
        query = Example(ep["_root"] / ep["query"], "", "Output:", words[ep["label"]])
        if demos == "random":  # balanced: half the shots from each class, in random order
            chosen = []
            for j, c in enumerate(ep["classes"]):
                sub = [e for e in pool if e.answer == words[c]]
                chosen += _choose(fs, sub, query, shots // 2 + (j < shots % 2), "random", rng)
            chosen = [chosen[i] for i in rng.permutation(len(chosen))]
        else:
            chosen = _choose(fs, pool, query, shots, "similar", rng)
        scores = fs.score(chosen, query, ep["words"])
        correct.append(ep["words"][int(np.argmax(scores))] == query.answer)
    return {"accuracy": _bootstrap(np.array(correct, float), seed=seed), "num_queries": len(correct)}


def _examples(path: str | Path, task: str) -> list[Example]:
    out = []
    for r in _read(path):
        image = r["_root"] / r["image"]
        if task == "caption":
            caption = r.get("caption") or r.get("answer")
            out.append(Example(image, CAPTION_FORMAT.format(caption), "Output:", caption))
        else:
            turns = r.get("conversations") or []
            question = next((t["value"] for t in turns if t.get("from") in ("human", "user")), "")
            question = question.replace("<image>", "").strip()
            out.append(Example(image, VQA_FORMAT.format(question, r["answer"]), f"Question: {question} Short answer:",
                               str(r["answer"])))  # fmt: skip
    return out


def evaluate_generative(fs: FewShot, task: str, support: str | Path, queries: str | Path, shots: int,
                        demos: str, limit: int | None = None, seed: int = 0) -> dict:  # fmt: skip
    """Captioning CIDEr or VQA accuracy with `shots` demonstrations per query (see the module docstring)."""
    from vlmkit.eval.captioning import caption_scores
    from vlmkit.eval.vqa import normalize_answer

    pool = _examples(support, task)
    every = _examples(queries, task)  # all of them give the references; the first `limit` are asked
    items = every[:limit]
    prompts = []
    for index, q in enumerate(items):
        candidates = [e for e in pool if e.image != q.image]  # never the query's own image
        prompts.append((_choose(fs, candidates, q, shots, demos, np.random.default_rng([seed, index])), q))
    answers = fs.generate(prompts)
    if task == "caption":
        refs: dict[Path, list[str]] = {}
        for e in every:
            refs.setdefault(e.image, []).append(e.answer)
        keys = list(range(len(items)))
        _, per = caption_scores(
            {i: refs[q.image] for i, q in enumerate(items)}, dict(zip(keys, answers, strict=True))
        )
        metric = {"cider": _bootstrap(np.asarray(per["cider"], float), seed=seed)}
    else:
        right = [
            normalize_answer(a) == normalize_answer(q.answer) for a, q in zip(answers, items, strict=True)
        ]
        metric = {"accuracy": _bootstrap(np.array(right, float), seed=seed)}
    examples = [
        {"image": str(q.image), "answer": a, "reference": q.answer}
        for q, a in zip(items[:10], answers, strict=False)
    ]
    return {**metric, "num_queries": len(items), "examples": examples}


def evaluate_fewshot(fs: FewShot, task: str, shots: list[int], demos: str, *, support: str | Path,
                     queries: str | Path, limit: int | None = None, seed: int = 0) -> dict:  # fmt: skip
    """{"task", "demos", "results": {shots: metrics}} for each shot count; `queries` is the episode file
    for `classify`."""
    if task not in TASKS:
        raise ConfigError(f"--task must be one of {', '.join(TASKS)}, not {task!r}")
    if demos not in DEMOS:
        raise ConfigError(f"--demos must be 'random' or 'similar', not {demos!r}")
    if any(k < 0 for k in shots):
        raise ConfigError(f"--shots must be >= 0, got {shots}")
    results = {}
    for k in shots:
        if task == "classify":
            results[k] = evaluate_classify(fs, queries, support, k, demos, limit, seed)
        else:
            results[k] = evaluate_generative(fs, task, support, queries, k, demos, limit, seed)
    return {"task": task, "demos": demos, "support": str(support), "queries": str(queries), "seed": seed,
            "results": results}  # fmt: skip


def plot_fewshot(result: dict, path: str | Path) -> Path:
    """The metric against the number of shots, with its interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shots = sorted(result["results"])
    key = "cider" if result["task"] == "caption" else "accuracy"
    vals = [result["results"][k][key] for k in shots]
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.errorbar(shots, [v["value"] for v in vals],
                yerr=[[v["value"] - v["low"] for v in vals], [v["high"] - v["value"] for v in vals]],
                marker="o", capsize=3)  # fmt: skip
    if result["task"] == "classify":
        ax.axhline(0.5, color="grey", linestyle=":", label="chance")
        ax.legend()
    ax.set_xlabel("shots")
    ax.set_ylabel(key)
    ax.set_title(f"{result['task']} ({result['demos']} demonstrations)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)

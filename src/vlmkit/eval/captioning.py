"""Caption metrics as the COCO caption evaluation (pycocoevalcap) computes them, without Java.

- `ptb_tokenize`: Stanford PTBTokenizer with `-lowerCase -preserveLines`, then pycocoevalcap's
  punctuation filter, re-implemented for caption text (punctuation, quotes, brackets, contractions,
  possessives, abbreviations, numbers).
- `bleu`: corpus BLEU-1..4 with pycocoevalcap's "closest" reference length and brevity penalty.
- `cider`: CIDEr-D (n = 4, sigma = 6): tf-idf n-gram vectors with document frequencies from the
  references of the evaluated set, clipped hypothesis weights, a Gaussian length penalty, x10.

Both scorers take already tokenised text, `{id: [caption, ...]}`, exactly like `Bleu().compute_score`
and `Cider().compute_score`, and return the same numbers (tests/eval/test_caption_metrics.py checks this).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence

import numpy as np

# pycocoevalcap drops exactly these tokens after PTB tokenisation. The bracket tokens are upper case
# here but the tokenizer lower-cases them, so "-lrb-" etc. survive: kept, so scores match the original.
PUNCTUATIONS = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)

_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_UNICODE = {
    "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u2018": "'", "\u2019": "'", "\u201a": "'",
    "\u2013": " -- ", "\u2014": " -- ", "\u2026": " ... ", "\u00a0": " ",
}  # fmt: skip
# Abbreviations that keep their full stop (a subset of PTBLexer's list: those that occur in captions).
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof st mt jr sr vs etc inc co corp ltd jan feb mar apr jun jul aug sep sept oct nov dec "
    "mon tue wed thu fri ave blvd rd gen col lt sgt capt gov sen rep rev ft".split()
)
_ABBREVIATIONS_BEFORE_NUMBER = frozenset({"no", "fig"})  # "no. 5" but "no."
_SPLIT_WORDS = {
    "cannot": ("can", "not"),
    "gonna": ("gon", "na"),
    "gotta": ("got", "ta"),
    "wanna": ("wan", "na"),
    "lemme": ("lem", "me"),
    "gimme": ("gim", "me"),
}
_CONTRACTION = re.compile(r"^(.+?)(n't|'s|'m|'d|'ll|'re|'ve)$")
# One PTB token: a bracket, a quote, a run of ?/!, a dot run, a dash run, or a run of anything else.
_PIECES = re.compile(
    r"""[()\[\]{}]|"|`+|[?!]+|\.{2,}|-{2,}|[;+=|~^*]|(?:[^\s()\[\]{}"`?!;+=|~^*.\-]|\.(?!\.)|-(?!-))+"""
)


def _split_word(word: str, before_number: bool = False) -> list[str]:
    """PTB tokens of one piece without spaces, brackets or quote marks (lower case); `before_number`:
    the next piece is a number."""
    tokens: list[str] = []
    # leading: a quote mark (not "'90s", "'em"), a hyphen, a currency sign or "#" before a number
    while word:
        if (
            word[0] == "'"
            and len(word) > 1
            and not re.match(r"'(\d|em\b|n'|t(is|was)\b|(s|m|d|ll|re|ve)\b)", word)
        ):
            tokens.append("'")
            word = word[1:]
        elif word[0] == "-" and len(word) > 1 and not word[1].isdigit():
            tokens.append("-")
            word = word[1:]
        elif word[0] in "$#" and len(word) > 1 and word[1].isdigit():
            tokens.append(word[0])
            word = word[1:]
        else:
            break
    tail: list[str] = []  # split off the end, innermost last
    while word:
        if word[-1] in ",:":
            tail.append(word[-1])
            word = word[:-1]
        elif word[-1] == "." and not _keeps_stop(word, before_number):
            tail.append(".")
            word = word[:-1]
        elif word[-1] == "'" and len(word) > 1 and not word.endswith("n'"):
            tail.append("'")
            word = word[:-1]
        elif word[-1] == "-" and len(word) > 1:
            tail.append("-")
            word = word[:-1]
        elif word[-1] == "%" and len(word) > 1:
            tail.append("%")
            word = word[:-1]
        else:
            break
    if word:
        if word in _SPLIT_WORDS:
            tokens += _SPLIT_WORDS[word]
        elif word.startswith("'t") and word[2:] in ("is", "was"):  # "'tis" -> "'t is"
            tokens += ["'t", word[2:]]
        elif word.startswith("y'") and len(word) > 2:  # "y'all" -> "y' all"
            tokens += ["y'", word[2:]]
        elif "'n'" in word and not word.startswith("'n'"):  # "rock'n'roll" -> "rock 'n' roll"
            head, rest = word.split("'n'", 1)
            tokens += [t for t in (head, "'n'", rest) if t]
        else:
            tokens += _contraction(word)
    # internal commas between letters ("a,b") separate words in PTB
    out = []
    for token in tokens + tail[::-1]:
        out += re.split(r"(?<=[^\d]),|,(?=[^\d])", token) if len(token) > 1 and "," in token else [token]
    return [t for t in out if t]


def _contraction(word: str) -> list[str]:
    m = _CONTRACTION.match(word)
    if m is None or not re.search(r"[a-z0-9]", m.group(1)):
        return [word]
    return list(m.groups())


def _keeps_stop(word: str, before_number: bool) -> bool:
    """Whether PTB keeps the final full stop of `word`: abbreviations, acronyms, single letters."""
    stem = word[:-1]
    if not stem or stem.endswith("."):
        return False
    if before_number and stem in _ABBREVIATIONS_BEFORE_NUMBER:
        return True
    return stem in _ABBREVIATIONS or re.fullmatch(r"[a-z]|([a-z]\.)+[a-z]", stem) is not None


def ptb_tokenize(text: str) -> str:
    """One caption as pycocoevalcap's `PTBTokenizer` leaves it: lower case, PTB tokens separated by
    single spaces, punctuation tokens removed. E.g. "A man's dog, (brown)." -> "a man 's dog -lrb- brown -rrb-"."""
    text = text.replace("\n", " ").lower()
    for char, replacement in _UNICODE.items():
        text = text.replace(char, replacement)
    tokens = []
    pieces = _PIECES.findall(text)
    for i, piece in enumerate(pieces):
        if piece in _BRACKETS:
            tokens.append(_BRACKETS[piece])
        elif piece[0] in '"`.':  # PTB writes quotes as `` or '' and any run of dots as ...
            tokens.append({'"': "''", "`": "`", ".": "..."}[piece[0]])
        elif piece[0] in ";?!" or piece.startswith("--") or len(piece) == 1 and piece in "+=|~^*":
            tokens.append(piece)
        else:
            tokens += _split_word(piece, i + 1 < len(pieces) and pieces[i + 1][0].isdigit())
    return " ".join(t for t in tokens if t not in PUNCTUATIONS)


def tokenize_captions(captions: Mapping[Hashable, Sequence[str]]) -> dict[Hashable, list[str]]:
    """`{id: [caption, ...]}` -> the same with every caption through `ptb_tokenize` (as
    `PTBTokenizer().tokenize`, which takes `{id: [{"caption": ...}]}`)."""
    return {key: [ptb_tokenize(c) for c in values] for key, values in captions.items()}


# ---------------------------------------------------------------------------------------------- scorers


def _check(gts: Mapping, res: Mapping) -> list:
    if gts.keys() != res.keys():
        raise ValueError("references and predictions must have the same ids")
    for key in gts:
        if not isinstance(res[key], list) or len(res[key]) != 1:
            raise ValueError(f"id {key!r}: expected a list with exactly one predicted caption")
        if not isinstance(gts[key], list) or not gts[key]:
            raise ValueError(f"id {key!r}: expected a non-empty list of reference captions")
    if not gts:
        raise ValueError("no captions to score")
    return list(gts)


def _ngrams(words: list[str], n: int) -> Counter:
    """Counts of every k-gram, k = 1..n, as tuples."""
    return Counter(tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def bleu(
    gts: Mapping[Hashable, list[str]], res: Mapping[Hashable, list[str]], n: int = 4
) -> tuple[list[float], list[list[float]]]:
    """BLEU-1..n of tokenised captions, as pycocoevalcap's `Bleu(n).compute_score(gts, res)`.

    Returns (corpus scores [BLEU-1, ..., BLEU-n], per-image scores [[BLEU-k of each image] for k]).
    Clipped n-gram matches and lengths are summed over the corpus; the effective reference length of an
    image is its reference length closest to the hypothesis (the shorter one on a tie).
    """
    small, tiny = 1e-9, 1e-15  # pycocoevalcap's guards: a zero count scores ~0, never divides by 0
    total_correct, total_guess = [0] * n, [0] * n
    total_test, total_ref = 0, 0
    per_image: list[list[float]] = [[] for _ in range(n)]
    for key in _check(gts, res):
        words = res[key][0].split()
        counts = _ngrams(words, n)
        max_ref: dict[tuple, int] = {}
        ref_lengths = []
        for ref in gts[key]:
            ref_words = ref.split()
            ref_lengths.append(len(ref_words))
            for gram, count in _ngrams(ref_words, n).items():
                max_ref[gram] = max(max_ref.get(gram, 0), count)
        test_len = len(words)
        ref_len = min((abs(length - test_len), length) for length in ref_lengths)[1]
        guess = [max(0, test_len - k + 1) for k in range(1, n + 1)]
        correct = [0] * n
        for gram, count in counts.items():
            correct[len(gram) - 1] += min(max_ref.get(gram, 0), count)
        total_test += test_len
        total_ref += ref_len
        score = 1.0
        for k in range(n):
            total_correct[k] += correct[k]
            total_guess[k] += guess[k]
            score *= (correct[k] + tiny) / (guess[k] + small)  # running product: BLEU-k = its (k+1)-th root
            per_image[k].append(score ** (1.0 / (k + 1)))
        ratio = (test_len + tiny) / (ref_len + small)
        if ratio < 1:  # brevity penalty
            for k in range(n):
                per_image[k][-1] *= math.exp(1 - 1 / ratio)
    scores, product = [], 1.0
    for k in range(n):
        product *= (total_correct[k] + tiny) / (total_guess[k] + small)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (total_test + tiny) / (total_ref + small)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores, per_image


def cider(
    gts: Mapping[Hashable, list[str]], res: Mapping[Hashable, list[str]], n: int = 4, sigma: float = 6.0
) -> tuple[float, np.ndarray]:
    """CIDEr-D of tokenised captions, as pycocoevalcap's `Cider().compute_score(gts, res)`.

    Returns (mean over images, per-image scores (N,)). The idf of an n-gram is log(number of images /
    number of images whose references contain it), so scores depend on the evaluated set as a whole.
    """
    keys = _check(gts, res)
    refs = {key: [_ngrams(r.split(), n) for r in gts[key]] for key in keys}
    document_frequency: Counter = Counter()
    for key in keys:
        document_frequency.update({gram for counts in refs[key] for gram in counts})
    log_num_images = math.log(len(keys))

    def vector(counts: Counter) -> tuple[list[dict], list[float], int]:
        """tf-idf weights per n-gram order, their norms, and the length (pycocoevalcap counts bigrams)."""
        vec: list[dict] = [{} for _ in range(n)]
        norm = [0.0] * n
        for gram, tf in counts.items():
            k = len(gram) - 1
            weight = float(tf) * (log_num_images - math.log(max(1.0, document_frequency[gram])))
            vec[k][gram] = weight
            norm[k] += weight**2
        # pycocoevalcap's `if n == 1` tests the 0-based order, so its "length" is the number of bigrams
        length = sum(tf for gram, tf in counts.items() if len(gram) == 2)
        return vec, [math.sqrt(v) for v in norm], length

    scores = np.zeros(len(keys))
    for i, key in enumerate(keys):
        vec, norm, length = vector(_ngrams(res[key][0].split(), n))
        total = np.zeros(n)
        for ref_counts in refs[key]:
            vec_ref, norm_ref, length_ref = vector(ref_counts)
            penalty = math.exp(-((length - length_ref) ** 2) / (2 * sigma**2))
            for k in range(n):
                # clipped: a hypothesis n-gram repeated more often than in the reference earns no more
                value = sum(
                    min(w, vec_ref[k].get(g, 0.0)) * vec_ref[k].get(g, 0.0) for g, w in vec[k].items()
                )
                if norm[k] != 0 and norm_ref[k] != 0:
                    value /= norm[k] * norm_ref[k]
                total[k] += value * penalty
        scores[i] = total.mean() / len(refs[key]) * 10.0
    return float(scores.mean()), scores


def caption_metrics(
    references: Mapping[Hashable, Sequence[str]] | Sequence[Sequence[str]],
    predictions: Mapping[Hashable, str] | Sequence[str],
) -> dict:
    """BLEU-1..4 and CIDEr of raw (untokenised) captions: `ptb_tokenize`, then `bleu` and `cider`.

    `references` holds one or more captions per image, `predictions` one caption per image, keyed by the
    same ids (or two aligned sequences). Returns {"bleu_1", ..., "bleu_4", "cider", "num_images"}.
    """
    return caption_scores(references, predictions)[0]


def caption_scores(references, predictions) -> tuple[dict, dict[str, np.ndarray]]:
    """`caption_metrics` plus per-image scores {"bleu_4": (N,), "cider": (N,)} in key order."""
    if not isinstance(references, Mapping):
        references = dict(enumerate(references))
    if not isinstance(predictions, Mapping):
        predictions = dict(enumerate(predictions))
    if references.keys() != predictions.keys():
        missing = (references.keys() - predictions.keys()) or (predictions.keys() - references.keys())
        raise ValueError(f"references and predictions differ in their ids (e.g. {next(iter(missing))!r})")
    gts = tokenize_captions({key: list(references[key]) for key in references})
    res = tokenize_captions({key: [predictions[key]] for key in references})
    bleus, bleu_per_image = bleu(gts, res)
    cider_mean, cider_per_image = cider(gts, res)
    metrics = {f"bleu_{k + 1}": score for k, score in enumerate(bleus)}
    metrics.update(cider=cider_mean, num_images=len(gts))
    return metrics, {"bleu_4": np.asarray(bleu_per_image[3]), "cider": cider_per_image}

"""Caption metrics against pycocoevalcap, the COCO caption evaluation itself.

BLEU and CIDEr-D get the same tokenised captions as pycocoevalcap's Bleu and Cider; the tokenizer is
checked against Stanford PTBTokenizer (pycocoevalcap's, run with Java when Java is installed) and on
hand-checked outputs of it.
"""

import shutil

import numpy as np
import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider

from vlmkit.data.synthetic import caption_scene, render_scene
from vlmkit.eval.captioning import (
    bleu,
    caption_metrics,
    caption_scores,
    cider,
    ptb_tokenize,
    tokenize_captions,
)

# Real PTBTokenizer output (CoreNLP 3.4.1 via pycocoevalcap) with punctuation dropped, recorded once.
PTB_CASES = {
    "A man riding a wave on top of a surfboard.": "a man riding a wave on top of a surfboard",
    "A woman's hand holding a smartphone.": "a woman 's hand holding a smartphone",
    "An old man (wearing a hat) sits on a bench.": "an old man -lrb- wearing a hat -rrb- sits on a bench",
    '"Stop" sign on the corner, isn\'t it?': "stop sign on the corner is n't it",
    "Someone's laptop is open... next to a cup": "someone 's laptop is open next to a cup",
    "A 10-year-old boy plays at 3 p.m. in the U.S.": "a 10-year-old boy plays at 3 p.m. in the u.s.",
    "A black and white photo -- people walking.": "a black and white photo people walking",
    "Dr. Smith's office; a view of Mt. Rainier.": "dr. smith 's office a view of mt. rainier",
    "can't won't gonna I'd we'll they're": "ca n't wo n't gon na i 'd we 'll they 're",
    "The kids' room: 20% full, costs $5!!!": "the kids room 20 % full costs $ 5 !!!",
    "Two red circles, a blue star; and 3.5 squares: ok...": "two red circles a blue star and 3.5 squares ok",
    "four shapes: a red circle, and two blue stars": "four shapes a red circle and two blue stars",
    "No. 5 is here. no.": "no. 5 is here no",
    "dogs [big] {curly} 3,000 1,2 a,b": "dogs -lsb- big -rsb- -lcb- curly -rcb- 3,000 1,2 a b",
    "“curly” ‘single’ en–dash … ellipsis": "curly single en dash ellipsis",
    "": "",
}


def realistic_captions(seed: int, num_images: int) -> tuple[dict, dict]:
    """References (2-5 synthetic captions of the same scene) and a hypothesis per image: a caption of the
    same scene, of another scene, a truncated or a word-shuffled one, or empty, with punctuation."""
    rng = np.random.default_rng(seed)
    metas = [render_scene(rng, image_size=32)[1] for _ in range(num_images)]
    gts, res = {}, {}
    for i, meta in enumerate(metas):
        refs = [caption_scene(meta, rng) for _ in range(int(rng.integers(2, 6)))]
        gts[f"img{i}"] = [r.capitalize() + "." if rng.random() < 0.5 else r for r in refs]
        kind = rng.integers(5)
        if kind == 0:
            hyp = caption_scene(meta, rng)
        elif kind == 1:
            hyp = caption_scene(metas[int(rng.integers(num_images))], rng)
        elif kind == 2:
            words = caption_scene(meta, rng).split()
            hyp = " ".join(words[: int(rng.integers(1, len(words) + 1))])
        elif kind == 3:
            hyp = " ".join(rng.permutation(caption_scene(meta, rng).split()))
        else:
            hyp = "" if rng.random() < 0.5 else "a a a red red circle circle circle, circle!"
        res[f"img{i}"] = [hyp]
    return gts, res


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bleu_and_cider_equal_pycocoevalcap(seed):
    gts, res = realistic_captions(seed, num_images=60)
    gts, res = tokenize_captions(gts), tokenize_captions(res)
    ref_bleu, ref_bleu_per_image = Bleu(4).compute_score(gts, res, verbose=0)
    scores, per_image = bleu(gts, res)
    np.testing.assert_allclose(scores, ref_bleu, rtol=0, atol=1e-9)
    np.testing.assert_allclose(per_image, ref_bleu_per_image, rtol=0, atol=1e-9)
    ref_cider, ref_cider_per_image = Cider().compute_score(gts, res)
    score, per_image = cider(gts, res)
    assert abs(score - ref_cider) < 1e-6
    np.testing.assert_allclose(per_image, ref_cider_per_image, rtol=0, atol=1e-6)
    assert 0 < scores[3] < scores[0] < 1 and score > 0.1  # a realistic, non-degenerate mix


def cases() -> list[tuple[dict, dict]]:
    return [
        ({1: ["a red circle"]}, {1: ["a red circle"]}),  # one image: every idf is log(1/1) = 0
        ({1: ["a red circle", "a circle"], 2: ["two blue stars"]}, {1: [""], 2: ["two blue stars"]}),  # empty
        (
            {1: ["a b c d e f g"], 2: ["x y"]},
            {1: ["a b c d e f g h i j"], 2: ["x y z"]},
        ),  # longer: no penalty
        (
            {1: ["a b c", "a b c d e"], 2: ["q r s t"]},
            {1: ["a b c d"], 2: ["q"]},
        ),  # tie for closest ref length
        ({1: ["the cat sat", "a cat"], 2: ["dog"]}, {1: ["cat cat cat cat"], 2: ["dog dog"]}),  # clipping
        (
            {1: ["a b"], 2: ["a b"], 3: ["c"]},
            {1: ["a b"], 2: ["b a"], 3: ["c"]},
        ),  # n-gram in every image: idf 0
    ]


@pytest.mark.parametrize("gts,res", cases())
def test_edge_cases_equal_pycocoevalcap(gts, res):
    assert bleu(gts, res)[0] == pytest.approx(Bleu(4).compute_score(gts, res, verbose=0)[0], abs=1e-12)
    ref_score, ref_per_image = Cider().compute_score(gts, res)
    score, per_image = cider(gts, res)
    assert score == pytest.approx(ref_score, abs=1e-9)
    np.testing.assert_allclose(per_image, ref_per_image, atol=1e-9)


def test_hand_checked_values():
    # one image, hypothesis = the reference: every precision is 1 (up to pycocoevalcap's 1e-9 guard)
    scores, _ = bleu({0: ["a red circle on the left"]}, {0: ["a red circle on the left"]})
    assert scores == pytest.approx([1.0] * 4, abs=1e-8)
    # "a circle" against "a red circle": p1 = 2/2, p2 = 0/1 -> BLEU-2 ~ 0; brevity penalty exp(1 - 3/2)
    scores, _ = bleu({0: ["a red circle"]}, {0: ["a circle"]})
    assert scores[0] == pytest.approx(np.exp(1 - 3 / 2), rel=1e-6)
    assert scores[1] < 1e-6
    assert cider({0: ["a b"]}, {0: ["a b"]})[0] == 0.0  # a single image has no informative n-gram


def test_input_checks():
    with pytest.raises(ValueError, match="same ids"):
        bleu({1: ["a"]}, {2: ["a"]})
    with pytest.raises(ValueError, match="exactly one"):
        cider({1: ["a"]}, {1: ["a", "b"]})
    with pytest.raises(ValueError, match="non-empty list"):
        bleu({1: []}, {1: ["a"]})
    with pytest.raises(ValueError, match="differ in their ids"):
        caption_metrics({1: ["a"]}, {2: "a"})


@pytest.mark.parametrize("text,expected", list(PTB_CASES.items()))
def test_ptb_tokenize_matches_recorded_ptbtokenizer_output(text, expected):
    assert ptb_tokenize(text) == expected


@pytest.mark.skipif(shutil.which("java") is None, reason="PTBTokenizer needs Java")
def test_ptb_tokenize_matches_ptbtokenizer_on_realistic_captions():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    gts, res = realistic_captions(7, num_images=20)
    captions = [c for refs in gts.values() for c in refs] + [r[0] for r in res.values()] + list(PTB_CASES)
    captions = [c for c in captions if c]  # PTBTokenizer drops the line of an empty caption
    java = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(captions)})
    assert [ptb_tokenize(c) for c in captions] == [java[i][0] for i in range(len(captions))]


def test_caption_metrics_tokenises_then_scores():
    gts, res = realistic_captions(3, num_images=20)
    predictions = {k: v[0] for k, v in res.items()}
    metrics = caption_metrics(gts, predictions)
    tok_gts, tok_res = tokenize_captions(gts), tokenize_captions(res)
    ref_bleu = Bleu(4).compute_score(tok_gts, tok_res, verbose=0)[0]
    assert [metrics[f"bleu_{k}"] for k in (1, 2, 3, 4)] == pytest.approx(ref_bleu, abs=1e-9)
    assert metrics["cider"] == pytest.approx(Cider().compute_score(tok_gts, tok_res)[0], abs=1e-6)
    assert metrics["num_images"] == 20
    # aligned sequences give the same numbers as dicts
    same = caption_metrics([gts[k] for k in gts], [predictions[k] for k in gts])
    assert same == metrics
    per_image = caption_scores(gts, predictions)[1]
    assert per_image["cider"].mean() == pytest.approx(metrics["cider"])
    assert per_image["bleu_4"].shape == (20,)

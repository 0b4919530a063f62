"""Text-to-image inference end to end on tiny random models saved as model folders: per-image seeds, bad prompts
as one line, CLIP reranking in the order its scores say, the scene reader's verdict on rendered scenes, and
`vlmkit generate-image` / `vlmkit eval text-to-image` through the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vlmkit.cli.main import main
from vlmkit.data.synthetic import render_scene
from vlmkit.data.tokenizer import Tokenizer
from vlmkit.data.transforms import ImageTransform, PreprocessConfig
from vlmkit.errors import ConfigError, DataError
from vlmkit.inference.text_to_image import (
    ClipScorer,
    TextToImagePipeline,
    default_prompts,
    judge,
    read_prompts,
    rerank_by_clip,
)
from vlmkit.models.pretrained import save_pretrained
from vlmkit.models.registry import create_model

CAPTIONS = ["a large red circle at the top left", "a small blue square in the centre", "a green star on the right",
            "a small yellow triangle at the bottom"] * 10  # fmt: skip


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2i")
    tok = Tokenizer.train(CAPTIONS, vocab_size=300, context_length=32)
    pre = PreprocessConfig(image_size=32)
    text = {"text.vocab_size": tok.vocab_size, "text.eot_token_id": tok.eot_token_id, "text.context_length": 32,
            "text.pad_token_id": tok.pad_token_id, "text.width": 32, "text.heads": 2, "text.layers": 1}  # fmt: skip
    torch.manual_seed(0)
    out = {}
    for name, seed in (("clip_a", 1), ("clip_b", 2)):
        torch.manual_seed(seed)
        clip = create_model("clip-tiny", **text, **{"vision.image_size": 32, "vision.width": 32, "vision.heads": 2,
                                                    "vision.layers": 1, "embed_dim": 16})  # fmt: skip
        out[name] = save_pretrained(clip, root / name, tok, pre, name="clip-tiny")
    flow = create_model(
        "flow-tiny",
        **text,
        embed_dim=16,
        cross_attention=True,
        **{"net.channels": (8, 16), "net.embed_dim": 32},
    )
    flow.update_ema()
    out["flow"] = save_pretrained(flow, root / "flow", tok, pre, name="flow-tiny")
    dalle = create_model("dalle-tiny", **{"vqvae.image_size": 32, "vqvae.channels": (8, 16, 32), "vqvae.codebook_size": 32,
                                          "vqvae.code_dim": 8, "decoder.width": 32, "decoder.layers": 1, "decoder.heads": 2,
                                          "decoder.max_seq_len": 64, "max_text_len": 24, "text_vocab_size": tok.vocab_size,
                                          "decoder.bos_token_id": tok.sot_token_id, "decoder.pad_token_id": tok.pad_token_id})  # fmt: skip
    out["dalle"] = save_pretrained(dalle, root / "dalle", tok, pre, name="dalle-tiny")
    return out


def test_each_image_depends_on_its_own_seed_alone(folders):
    pipe = TextToImagePipeline.from_pretrained(folders["flow"])
    many = pipe.generate(CAPTIONS[:2], 3, seed=5, steps=4)
    alone = pipe.generate(CAPTIONS[1:2], 1, seed=7, steps=4)  # prompt 2's third image: seed 5 + 2
    assert many.shape == (2, 3, 3, 32, 32) and many.dtype == torch.uint8
    assert (many[1, 2].int() - alone[0, 0].int()).abs().max() <= 1  # batched convolutions round differently
    assert not torch.equal(many[1, 0], many[1, 1])
    dalle = TextToImagePipeline.from_pretrained(folders["dalle"])
    a, b = dalle.generate(CAPTIONS[:2], 2, seed=3), dalle.generate(CAPTIONS[:2], 2, seed=3)
    assert torch.equal(a, b) and not torch.equal(a[0, 0], a[0, 1])


@pytest.mark.parametrize("family", ["flow", "dalle"])
def test_bad_prompts_and_counts_are_config_errors(folders, family):
    pipe = TextToImagePipeline.from_pretrained(folders[family])
    with pytest.raises(ConfigError, match="prompt 2 is empty"):
        pipe.generate(["a red circle", "  "], 1)
    with pytest.raises(ConfigError, match="prompt 1 is .* tokens long; .* at most"):
        pipe.generate(["a red circle " * 20], 1)
    with pytest.raises(ConfigError, match="at least 1"):
        pipe.generate(["a red circle"], 0)
    with pytest.raises(ConfigError, match="sample with"):
        pipe.generate(["a red circle"], 1, beams=2)


def test_a_dual_encoder_is_not_a_text_to_image_model(folders):
    with pytest.raises(ConfigError, match="not a text-to-image"):
        TextToImagePipeline.from_pretrained(folders["clip_a"])
    with pytest.raises(ConfigError, match="not a CLIP"):
        ClipScorer(folders["flow"])


def test_reranking_orders_by_the_clips_own_similarity(folders):
    scorer = ClipScorer(folders["clip_a"])
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (6, 3, 32, 32), dtype=np.uint8))
    order, scores = rerank_by_clip(scorer, images, "a red circle")
    # independently: the CLIP's embeddings of the evaluation transform's pixels, cosine in float64
    t = ImageTransform(scorer.preprocess, train=False)
    pix = torch.stack([t(Image.fromarray(im.permute(1, 2, 0).numpy())) for im in images])
    with torch.no_grad():
        img = F.normalize(scorer.model.encode_image(pix).double(), dim=-1)
        txt = F.normalize(scorer.model.encode_text(scorer.tokenizer(["a red circle"])).double(), dim=-1)[0]
    expected = img @ txt
    assert order.tolist() == torch.argsort(expected, descending=True).tolist()
    assert torch.allclose(scores.double(), expected[order], atol=1e-5)


def test_the_judge_reads_rendered_scenes():
    rng = np.random.default_rng(4)
    image, meta = render_scene(rng, 64, num_objects=1)
    obj = meta["objects"][0]
    x = torch.from_numpy(np.asarray(image)).permute(2, 0, 1)
    prompt = {k: obj[k] for k in ("colour", "shape", "size", "position")}
    assert judge(x, prompt) == {"count": True, "colour": True, "shape": True, "size": True, "position": True,
                                "all_correct": True}  # fmt: skip
    wrong = judge(x, {**prompt, "colour": "red" if obj["colour"] != "red" else "blue"})
    assert wrong["colour"] is False and wrong["all_correct"] is False and wrong["shape"] is True
    two, _ = render_scene(rng, 64, num_objects=2)
    assert judge(torch.from_numpy(np.asarray(two)).permute(2, 0, 1), prompt)["count"] is False


def test_default_prompts_cover_the_vocabulary_and_prompt_files_are_checked(tmp_path):
    prompts = default_prompts()
    for key in ("colour", "shape", "size", "position"):
        assert len({p[key] for p in prompts}) > 1
    assert all(p["text"].startswith(("a ", "an ")) for p in prompts)
    plain = default_prompts(("colour", "shape"))
    assert len(plain) == len(prompts) // 2 and all(set(p) == {"colour", "shape", "text"} for p in plain)
    assert plain[0]["text"] == f"a {plain[0]['colour']} {plain[0]['shape']}"
    with pytest.raises(ConfigError, match="attributes are some of"):
        default_prompts(("colour", "hue"))
    good = tmp_path / "p.jsonl"
    good.write_text('{"text": "a red circle", "colour": "red", "shape": "circle"}\n\n')
    assert read_prompts(good) == [{"text": "a red circle", "colour": "red", "shape": "circle"}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a red circle"}\n{"text": "x", "hue": "red"}\n')
    with pytest.raises(DataError, match="bad.jsonl:2: unknown keys"):
        read_prompts(bad)
    txt = tmp_path / "p.txt"
    txt.write_text("a red circle\na blue square\n")
    assert [p["text"] for p in read_prompts(txt)] == ["a red circle", "a blue square"]


def test_generate_image_writes_pngs_a_grid_and_seeds(folders, tmp_path):
    out = tmp_path / "gen"
    main(["generate-image", "--model", str(folders["flow"]), "--prompt", "a red circle", "--prompt", "a blue square",
          "--num-images", "3", "--seed", "10", "--steps", "4", "--out", str(out)])  # fmt: skip
    meta = json.loads((out / "images.json").read_text())
    assert [r["seed"] for r in meta["images"]] == [10, 11, 12, 10, 11, 12]
    assert all(Image.open(out / r["file"]).size == (32, 32) for r in meta["images"])
    assert (out / "grid.png").is_file()
    # reranked: the best two of each prompt, in the reranker's order
    out2 = tmp_path / "gen2"
    main(["generate-image", "--model", str(folders["dalle"]), "--prompt", "a red circle", "--num-images", "4",
          "--rerank", str(folders["clip_a"]), "--keep", "2", "--out", str(out2)])  # fmt: skip
    rows = json.loads((out2 / "images.json").read_text())["images"]
    assert [r["rank"] for r in rows] == [0, 1] and rows[0]["clip_similarity"] >= rows[1]["clip_similarity"]
    scorer = ClipScorer(folders["clip_a"])
    pix = torch.stack(
        [torch.from_numpy(np.asarray(Image.open(out2 / r["file"]))).permute(2, 0, 1) for r in rows]
    )
    assert scorer.scores(pix, "a red circle").tolist() == pytest.approx(
        [r["clip_similarity"] for r in rows], abs=1e-3
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--prompt", ""], "prompt 1 is empty"),
        (["--prompt", "a red circle " * 20], "tokens long"),
        (["--prompt", "a red circle", "--num-images", "0"], "at least 1"),
        (["--prompt", "a red circle", "--keep", "2"], "--keep K"),
    ],
)
def test_generate_image_mistakes_are_one_line(folders, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        main(["generate-image", "--model", str(folders["flow"]), *args, "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and message in err


def test_eval_text_to_image_reports_every_measure(folders, shapes_dir, tmp_path):
    out = tmp_path / "ev"
    main(["eval", "text-to-image", "--model", str(folders["flow"]), "--limit", "6", "--num-images", "3",
          "--steps", "2", "--rerank", str(folders["clip_a"]), "--judge", str(folders["clip_b"]),
          "--data", str(shapes_dir / "val.jsonl"), "--train-data", str(shapes_dir / "train.jsonl"), "--out", str(out)])  # fmt: skip
    r = json.loads((out / "text_to_image.json").read_text())
    assert r["prompts"] == 6 and r["images_per_prompt"] == 3
    for part in ("any_sample", "reranked"):
        assert set(r["accuracy"][part]) == {"count", "colour", "shape", "size", "position", "all_correct"}
    gain = r["accuracy"]["reranked"]["all_correct"] - r["accuracy"]["any_sample"]["all_correct"]
    assert r["accuracy"]["rerank_gain_all_correct"] == pytest.approx(gain)
    assert 0 <= r["reader_ceiling"]["colour"] <= 1
    assert r["kid"]["real_vs_real"] < r["kid"]["generated_vs_real"]  # random models are far from real scenes
    assert 0 <= r["r_precision"]["first"] <= 1 and r["clip_score"]["any_sample"] >= 0
    assert "diversity" in r and r["memorisation"]["train_images"] > 0
    assert (out / "report.html").is_file() and (out / "samples.png").is_file()
    with pytest.raises(ConfigError, match="judge CLIP must differ"):
        from vlmkit.inference.text_to_image import evaluate_text_to_image

        scorer = ClipScorer(folders["clip_a"])
        evaluate_text_to_image(TextToImagePipeline.from_pretrained(folders["flow"]), default_prompts()[:1],
                               num_images=1, reranker=scorer, judge_clip=scorer, steps=1, progress=False)  # fmt: skip

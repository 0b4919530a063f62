"""Hugging Face CLIP / SigLIP folders <-> vlmkit: parity against transformers itself on the same weights.

Each configuration builds a tiny random transformers model, saves it, loads it with vlmkit, and checks
image embeddings, text embeddings and logits against transformers (within 1e-5, fp32); then exports the
vlmkit model and checks that transformers loads it, every key accounted for, with the same outputs.
"""

import json
import math
from argparse import ArgumentParser
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlmkit.cli.export import register_export_cli
from vlmkit.config import save_json
from vlmkit.convert import is_model_dir, load_pretrained
from vlmkit.convert.clip import ACTS_TO_HF, config_from_hf, save_hf
from vlmkit.data.tokenizer import Tokenizer
from vlmkit.data.transforms import PreprocessConfig
from vlmkit.errors import ConfigError
from vlmkit.models import create_model
from vlmkit.models.pretrained import save_pretrained

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

ATOL = 1e-5
TEXTS = [
    "a photo of a cat",
    "cat",
    "",
    "photo cat photo cat photo cat photo cat photo cat photo cat photo cat photo cat",  # truncated
    "Ünïcode, punctuation!! and   spaces",
]
MERGES = [("c", "a"), ("ca", "t</w>"), ("p", "h"), ("ph", "o"), ("pho", "t"), ("phot", "o</w>")]


def clip_tokenizer(folder: Path, context_length: int, pad_token: str = "<|endoftext|>"):
    """A small OpenAI-style CLIP BPE (bytes, bytes + </w>, a few merges, then SOT and EOT, the largest id)."""
    alphabet = sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab.update({ch + "</w>": len(alphabet) + i for i, ch in enumerate(alphabet)})
    for a, b in MERGES:
        vocab.setdefault(a + b, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tok = transformers.CLIPTokenizer(
        vocab=vocab, merges=MERGES, model_max_length=context_length, pad_token=pad_token
    )
    tok.save_pretrained(folder)
    return tok, len(vocab)


def word_tokenizer(folder: Path, context_length: int):
    """A SigLIP-style fast tokenizer: no start token, "</s>" at the end, its own pad token."""
    words = ["<pad>", "</s>", "<unk>", *"a photo of cat dog red blue , ! and".split()]
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, "<unk>"))
    backend.normalizer = tokenizers.normalizers.Lowercase()
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    backend.post_processor = tokenizers.processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 1)]
    )
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=context_length,
    )
    tok.save_pretrained(folder)
    return tok, len(words)


def hf_ids(tok, context_length: int) -> torch.Tensor:
    return tok(TEXTS, padding="max_length", truncation=True, max_length=context_length, return_tensors="pt")[
        "input_ids"
    ]


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 1) -> None:
    """Every parameter random (norm gains near 1), so that a swapped or dropped tensor shows."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g) * 0.2
        p.copy_(1 + noise if "norm" in name and name.endswith("weight") else noise)


def pooled(out) -> torch.Tensor:
    return out.pooler_output if hasattr(out, "pooler_output") else out


@torch.no_grad()
def assert_parity(hf_model, ours, hf_input_ids, our_input_ids, pixels) -> dict:
    """Embeddings and logits of transformers vs vlmkit; returns the largest differences."""
    theirs = (
        pooled(hf_model.get_image_features(pixel_values=pixels)),
        pooled(hf_model.get_text_features(input_ids=hf_input_ids)),
        hf_model(input_ids=hf_input_ids, pixel_values=pixels).logits_per_image,
    )
    mine = (ours.encode_image(pixels), ours.encode_text(our_input_ids), ours.logits(pixels, our_input_ids)[0])
    for name, a, b in zip(("image", "text", "logits"), theirs, mine):
        torch.testing.assert_close(b, a, atol=ATOL, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
    return {n: (a - b).abs().max().item() for n, a, b in zip(("image", "text", "logits"), theirs, mine)}


# name -> (model_type, text_config, vision_config, extra, weights format)
CONFIGS = {
    "clip-quick_gelu-legacy-eos": (
        "clip",
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=12, hidden_act="quick_gelu", eos_token_id=2),
        dict(hidden_size=48, intermediate_size=192, num_hidden_layers=2, num_attention_heads=3,
             image_size=32, patch_size=8, hidden_act="quick_gelu"),
        dict(projection_dim=24),
        "sharded",
    ),
    "clip-gelu-patch4-pad!": (
        "clip",
        dict(hidden_size=48, intermediate_size=100, num_hidden_layers=1, num_attention_heads=6,
             max_position_embeddings=7, hidden_act="gelu"),
        dict(hidden_size=32, intermediate_size=72, num_hidden_layers=2, num_attention_heads=2,
             image_size=16, patch_size=4, hidden_act="gelu"),
        dict(projection_dim=40),
        "bin",
    ),
    "clip-mixed-patch14": (
        "clip",
        dict(hidden_size=32, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
             max_position_embeddings=20, hidden_act="gelu", layer_norm_eps=1e-6),
        dict(hidden_size=24, intermediate_size=96, num_hidden_layers=1, num_attention_heads=3,
             image_size=28, patch_size=14, hidden_act="quick_gelu"),
        dict(projection_dim=16),
        "safetensors",
    ),
    "siglip-patch8": (
        "siglip",
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=10, projection_size=48),
        dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             image_size=32, patch_size=8),
        {},
        "safetensors",
    ),
    "siglip-patch4-gelu": (
        "siglip",
        dict(hidden_size=16, intermediate_size=40, num_hidden_layers=1, num_attention_heads=2,
             max_position_embeddings=16, projection_size=32, hidden_act="gelu"),
        dict(hidden_size=32, intermediate_size=72, num_hidden_layers=2, num_attention_heads=2,
             image_size=16, patch_size=4, hidden_act="gelu"),
        {},
        "sharded",
    ),
}  # fmt: skip


WEIGHTS = {
    "bin": "pytorch_model.bin",
    "sharded": "model.safetensors.index.json",
    "safetensors": "model.safetensors",
}


def build_hf(name: str, folder: Path):
    """Save a random transformers model of configuration `name` (and its tokenizer) to `folder`."""
    model_type, text, vision, extra, fmt = CONFIGS[name]
    ctx = text["max_position_embeddings"]
    if model_type == "clip":
        tok, vocab = clip_tokenizer(folder, ctx, pad_token="!" if "pad!" in name else "<|endoftext|>")
        text = {"eos_token_id": vocab - 1, "bos_token_id": vocab - 2, **text}
        config = transformers.CLIPConfig(
            text_config={**text, "vocab_size": vocab}, vision_config=vision, **extra
        )
        cls = transformers.CLIPModel
    else:
        tok, vocab = word_tokenizer(folder, ctx)
        text = {"eos_token_id": 1, "pad_token_id": 0, "bos_token_id": None, **text, "vocab_size": vocab}
        config = transformers.SiglipConfig(text_config=text, vision_config=vision)
        cls = transformers.SiglipModel
    torch.manual_seed(0)
    model = cls(config).eval()
    randomize(model)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(20.0))
        if model_type == "siglip":
            model.logit_bias.fill_(-4.0)
    if fmt == "bin":
        model.config.save_pretrained(folder)
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    else:
        model.save_pretrained(folder, max_shard_size="20KB" if fmt == "sharded" else "1GB")
    return model, tok, cls


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_both_directions(name, tmp_path):
    hf_dir, out = tmp_path / "hf", tmp_path / "exported"
    theirs, hf_tok, cls = build_hf(name, hf_dir)
    assert (hf_dir / WEIGHTS[CONFIGS[name][-1]]).is_file()
    assert is_model_dir(hf_dir)
    ctx = theirs.config.text_config.max_position_embeddings
    pixels = torch.randn(3, 3, theirs.config.vision_config.image_size, theirs.config.vision_config.image_size)

    # 1. vlmkit loads their folder: same ids, same embeddings and logits
    pt = load_pretrained(hf_dir)
    ids = hf_ids(hf_tok, ctx)
    assert torch.equal(pt.tokenizer(TEXTS), ids)
    if CONFIGS[name][1].get("eos_token_id") == 2:
        assert pt.model.cfg.text.pool == "argmax"  # transformers' legacy pooling, reproduced
    assert_parity(theirs, pt.model, ids, ids, pixels)

    # 2. transformers loads vlmkit's export: every key used, same outputs, same tokenizer ids
    save_hf(pt.model, out, pt.tokenizer, pt.preprocess)
    reloaded, info = cls.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    exported_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert torch.equal(hf_ids(exported_tok, ctx), ids)
    if cls is transformers.CLIPModel:  # the CLIP class rebuilds its pipeline from the vocabulary: still equal
        assert torch.equal(hf_ids(transformers.CLIPTokenizerFast.from_pretrained(out), ctx), ids)
    assert_parity(reloaded.eval(), pt.model, ids, ids, pixels)
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(input_ids=ids, pixel_values=pixels).logits_per_image,
            theirs(input_ids=ids, pixel_values=pixels).logits_per_image,
            atol=ATOL,
            rtol=0,
        )
    # and vlmkit reads its own export back
    again = load_pretrained(out)
    assert torch.equal(again.tokenizer(TEXTS), ids)
    assert_parity(theirs, again.model, ids, ids, pixels)


@pytest.mark.parametrize("model_type", ["clip", "siglip"])
def test_config_defaults_match_transformers(model_type):
    """A config.json that leaves keys out means transformers' defaults: vlmkit fills in the same ones."""
    ours = config_from_hf({"model_type": model_type}, "config.json", logit_scale=1.0, logit_bias=None)
    theirs = (transformers.CLIPConfig if model_type == "clip" else transformers.SiglipConfig)()
    for tower, hf in ((ours.vision, theirs.vision_config), (ours.text, theirs.text_config)):
        assert (tower.width, tower.layers, tower.heads) == (
            hf.hidden_size,
            hf.num_hidden_layers,
            hf.num_attention_heads,
        )
        assert int(tower.width * tower.mlp_ratio) == hf.intermediate_size
        assert tower.norm_eps == hf.layer_norm_eps
        assert ACTS_TO_HF[tower.act] == hf.hidden_act
    assert (ours.vision.image_size, ours.vision.patch_size) == (
        theirs.vision_config.image_size,
        theirs.vision_config.patch_size,
    )
    assert (ours.text.vocab_size, ours.text.context_length) == (
        theirs.text_config.vocab_size,
        theirs.text_config.max_position_embeddings,
    )
    if model_type == "clip":
        assert (
            ours.embed_dim == theirs.projection_dim
            and ours.text.eot_token_id == theirs.text_config.eos_token_id
        )


# ---------------------------------------------------------------------------------------------- vlmkit -> HF

SMALL = {
    "embed_dim": 32, "vision.width": 32, "vision.layers": 2, "vision.heads": 2, "vision.image_size": 32,
    "vision.patch_size": 8, "text.width": 32, "text.layers": 2, "text.heads": 2, "text.vocab_size": 300,
    "text.context_length": 16,
}  # fmt: skip
CORPUS = ["a photo of a cat", "a red circle", "a blue square on the grass", "a dog next to a tree"] * 10


def vlmkit_run(folder: Path, family: str) -> tuple[torch.nn.Module, Tokenizer]:
    """A vlmkit run folder as the trainer leaves it: model, tokenizer, preprocess, eval results, config."""
    torch.manual_seed(0)
    model = create_model(f"{family}-tiny", **SMALL).eval()
    randomize(model)
    tok = Tokenizer.train(CORPUS, vocab_size=300, context_length=16)
    save_pretrained(model, folder, tok, PreprocessConfig(image_size=32), name=f"{family}-tiny")
    (folder / "eval").mkdir()
    zs = {
        "acc1": 0.8125,
        "acc5": 1.0,
        "mean_per_class_recall": 0.75,
        "num_images": 16,
        "per_class_accuracy": {},
    }
    ret = {"image_retrieval_recall@1": 0.5, "text_retrieval_recall@5": 0.9375, "num_images": 16}
    for file, task, dataset, metrics in [
        ("zeroshot.json", "zeroshot_classification", "shapes-val", zs),
        ("retrieval.json", "zeroshot_retrieval", "val", ret),
    ]:
        save_json(
            {"dataset": dataset, "model": str(folder), "task": task, "metrics": metrics},
            folder / "eval" / file,
        )
    save_json(
        {
            "train": {
                "data": {"train": "data/shapes/train.jsonl"},
                "model": {"name": f"{family}-tiny"},
                "batch_size": 128,
            }
        },
        folder / "train_config.json",
    )
    return model, tok


def export(src: Path, out: Path, *extra: str) -> None:
    parser = ArgumentParser()
    register_export_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["export", "--model", str(src), "--out", str(out), *extra])
    args.func(args)


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_vlmkit_model_in_transformers(family, tmp_path, capsys):
    src, out = tmp_path / "run", tmp_path / "hf"
    ours, tok = vlmkit_run(src, family)
    export(src, out, "--name", f"my-{family}")
    assert "wrote" in capsys.readouterr().out
    cls = transformers.CLIPModel if family == "clip" else transformers.SiglipModel
    theirs, info = cls.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = hf_ids(hf_tok, 16)
    if family == "clip":
        # transformers reads eos id 2 as its legacy argmax flag, so the export renumbers vlmkit's end token
        assert hf_tok.eos_token_id != 2 and theirs.config.text_config.eos_token_id == hf_tok.eos_token_id
        assert torch.equal(torch.where(ids == hf_tok.eos_token_id, 2, ids), tok(TEXTS))
    else:
        assert torch.equal(ids, tok(TEXTS))
    pixels = torch.randn(2, 3, 32, 32)
    diffs = assert_parity(theirs.eval(), ours, ids, tok(TEXTS), pixels)
    assert max(diffs.values()) < ATOL
    # vlmkit reads the export back with transformers' ids
    again = load_pretrained(out)
    assert torch.equal(again.tokenizer(TEXTS), ids)
    assert_parity(theirs, again.model, ids, ids, pixels)


def test_model_card(tmp_path):
    yaml = pytest.importorskip("yaml")
    src, out = tmp_path / "run", tmp_path / "hf"
    vlmkit_run(src, "clip")
    export(src, out, "--name", "shapes-clip")
    text = (out / "README.md").read_text()
    _, front, body = text.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert meta["library_name"] == "vlmkit"
    assert meta["pipeline_tag"] == "zero-shot-image-classification"
    (entry,) = meta["model-index"]
    assert entry["name"] == "shapes-clip"
    found = {
        (r["task"]["type"], r["dataset"]["name"], m["name"]): m["value"]
        for r in entry["results"]
        for m in r["metrics"]
    }
    assert found == {
        ("zero-shot-image-classification", "shapes-val", "top-1 accuracy"): 0.8125,
        ("zero-shot-image-classification", "shapes-val", "top-5 accuracy"): 1.0,
        ("zero-shot-image-classification", "shapes-val", "mean per-class recall"): 0.75,
        ("zero-shot-image-retrieval", "val", "image retrieval recall@1"): 0.5,
        ("zero-shot-image-retrieval", "val", "text retrieval recall@5"): 0.9375,
    }
    for section in ("## Model details", "## Intended use", "## Factors", "## Metrics", "## Evaluation data",
                    "## Training data", "## Quantitative analyses", "## Ethical considerations",
                    "## Caveats and recommendations"):  # fmt: skip
        assert section in body  # Mitchell et al.'s sections
    assert "[More Information Needed]" in body  # license, contact: what the folder cannot say
    assert "data/shapes/train.jsonl" in body
    hub = pytest.importorskip("huggingface_hub")
    card = hub.ModelCard.load(out / "README.md")  # the Hub's own parser accepts the model-index
    assert len(card.data.eval_results) == 5
    assert {r.metric_value for r in card.data.eval_results} == set(found.values())


# ---------------------------------------------------------------------------------------------- tokenizers


@pytest.mark.parametrize("pad_token", ["<|endoftext|>", "!"])
def test_clip_tokenizer_ids_match_transformers(pad_token, tmp_path):
    hf_tok, _ = clip_tokenizer(tmp_path, 16, pad_token=pad_token)
    ours = Tokenizer.from_file(tmp_path)
    assert ours.context_length == 16  # model_max_length from tokenizer_config.json
    assert ours.pad_token_id == hf_tok.pad_token_id and ours.eot_token_id == hf_tok.eos_token_id
    assert torch.equal(ours(TEXTS), hf_ids(transformers.CLIPTokenizerFast.from_pretrained(tmp_path), 16))
    assert ours.decode(ours("a photo of a cat")[0]) == "a photo of a cat"  # no "</w>" left in


def test_vlmkit_tokenizer_save_hf(tmp_path):
    tok = Tokenizer.train(CORPUS, vocab_size=300, context_length=12)
    tok.save_hf(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and config["model_max_length"] == 12
    assert torch.equal(hf_ids(transformers.AutoTokenizer.from_pretrained(tmp_path), 12), tok(TEXTS))
    swapped = tok.with_swapped_ids(2, tok.vocab_size - 1)
    a, b = tok(TEXTS), swapped(TEXTS)
    assert torch.equal(torch.where(a == 2, tok.vocab_size - 1, torch.where(a == tok.vocab_size - 1, 2, a)), b)
    assert swapped.decode(b[0]) == tok.decode(a[0]) == TEXTS[0]


# ---------------------------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    build_hf("clip-mixed-patch14", folder)
    return folder


def copy_dir(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def edit_json(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def test_unknown_model_type(clip_dir, tmp_path):
    d = copy_dir(clip_dir, tmp_path / "m")
    edit_json(d / "config.json", lambda c: c.update(model_type="bert"))
    with pytest.raises(ConfigError, match=r"config.json: unknown model_type 'bert'"):
        load_pretrained(d)


def test_missing_and_unexpected_keys(clip_dir, tmp_path):
    d = copy_dir(clip_dir, tmp_path / "m")
    state = load_file(d / "model.safetensors")
    del state["text_projection.weight"]
    state["vision_model.extra.weight"] = torch.zeros(2)
    save_file(state, d / "model.safetensors")
    with pytest.raises(ConfigError) as e:
        load_pretrained(d)
    msg = str(e.value)
    assert "\n" not in msg and "model.safetensors" in msg
    assert "missing keys text_projection.weight" in msg and "unexpected keys vision_model.extra.weight" in msg


def test_mismatched_shapes(clip_dir, tmp_path):
    d = copy_dir(clip_dir, tmp_path / "m")
    edit_json(d / "config.json", lambda c: c.update(projection_dim=20))
    with pytest.raises(
        ConfigError, match=r"(visual|text)_projection.weight has shape 16x\d+ but config.json gives 20x\d+"
    ):
        load_pretrained(d)


def test_unsupported_activation(clip_dir, tmp_path):
    d = copy_dir(clip_dir, tmp_path / "m")
    edit_json(d / "config.json", lambda c: c["vision_config"].update(hidden_act="relu"))
    with pytest.raises(ConfigError, match=r"vision_config: hidden_act 'relu' is not supported"):
        load_pretrained(d)


def test_tokenizer_that_does_not_fit(clip_dir, tmp_path):
    d = copy_dir(clip_dir, tmp_path / "m")
    edit_json(d / "config.json", lambda c: c["text_config"].update(vocab_size=100))
    state = load_file(d / "model.safetensors")
    state["text_model.embeddings.token_embedding.weight"] = state[
        "text_model.embeddings.token_embedding.weight"
    ][:100]
    save_file(state, d / "model.safetensors")
    with pytest.raises(
        ConfigError, match=r"tokenizer.json has 520 tokens but .*config.json gives the model 100"
    ):
        load_pretrained(d)
    d2 = copy_dir(clip_dir, tmp_path / "m2")
    edit_json(d2 / "config.json", lambda c: c["text_config"].update(eos_token_id=5))
    with pytest.raises(
        ConfigError, match=r"end token '<\|endoftext\|>' has id 519 but .*text_config.eos_token_id is 5"
    ):
        load_pretrained(d2)


def test_sentencepiece_only_tokenizer(tmp_path):
    d = tmp_path / "sig"
    build_hf("siglip-patch8", d)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (d / f).unlink(missing_ok=True)
    (d / "spiece.model").write_bytes(b"\x00sentencepiece")
    with pytest.raises(
        ConfigError, match=r"only a sentencepiece tokenizer \(spiece.model\); vlmkit needs a tokenizer.json"
    ):
        load_pretrained(d)


class _Payload:
    def __reduce__(self):  # what a malicious checkpoint does: run code when unpickled
        return (Path.touch, (Path(self.marker),))


def test_pytorch_bin_is_never_unpickled(clip_dir, tmp_path):
    d = copy_dir(clip_dir, tmp_path / "m")
    (d / "model.safetensors").unlink()
    payload = _Payload()
    payload.marker = str(tmp_path / "pwned")
    state = {k: v for k, v in load_file(clip_dir / "model.safetensors").items()}
    torch.save({**state, "evil": payload}, d / "pytorch_model.bin")
    with pytest.raises(ConfigError, match=r"pytorch_model.bin holds more than tensors.*never unpickles"):
        load_pretrained(d)
    assert not (tmp_path / "pwned").exists()
    torch.save(state, d / "pytorch_model.bin")  # plain tensors load
    assert load_pretrained(d).model.cfg.embed_dim == 16


def test_missing_shard(tmp_path):
    d = tmp_path / "m"
    build_hf("siglip-patch4-gelu", d)
    shard = sorted(d.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(ConfigError, match=rf"lists shard {shard.name}, which is not in"):
        load_pretrained(d)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (
            {"vision.stem": "conv"},
            r"vision.stem='conv' \(a convolutional stem\) has no Hugging Face .*vision.stem=patch",
        ),
        ({"vision.pool": "mean"}, r"vision.pool='mean'"),
        ({"text.causal": False}, r"text.causal=false does not fit Hugging Face's CLIP architecture"),
    ],
)
def test_export_refuses_what_transformers_cannot_hold(overrides, match, tmp_path):
    model = create_model("clip-tiny", **{**SMALL, **overrides})
    tok = Tokenizer.train(CORPUS, vocab_size=300, context_length=16)
    with pytest.raises(ConfigError, match=match):
        save_hf(model, tmp_path / "out", tok)
    assert not (tmp_path / "out").exists()  # refused before writing anything


def test_export_into_a_used_folder(clip_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"--out .* is not an empty folder"):
        export(clip_dir, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

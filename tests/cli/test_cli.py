"""The `vlmkit` command end to end on a tiny configuration, and its one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from vlmkit.cli.main import build_parser, main


def run_cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vlmkit", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def trained(shapes_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    main(
        [
            "train",
            "--recipe",
            "clip-tiny",
            "--smoke",
            "--train-data",
            str(shapes_dir / "train.jsonl"),
            "--val-data",
            str(shapes_dir / "val.jsonl"),
            "--out",
            str(out),
            "--set",
            "max_steps=3",
        ]
    )
    return out


def test_every_subcommand_has_help(capsys):
    parser = build_parser()
    for cmd in (
        ["quickstart"],
        ["data", "synth"],
        ["train"],
        ["eval", "zeroshot"],
        ["eval", "retrieval"],
        ["eval", "linear-probe"],
        ["embed"],
        ["classify"],
        ["report"],
        ["audit"],
    ):
        with pytest.raises(SystemExit) as e:
            parser.parse_args([*cmd, "--help"])
        assert e.value.code == 0
        assert "usage: vlmkit" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--help"])
    help_text = capsys.readouterr().out
    for flag in ("--recipe", "--train-data", "--val-data", "--out", "--time-budget", "--resume"):
        assert flag in help_text


def test_data_synth_writes_manifest_and_imagefolder(tmp_path, capsys):
    main(
        [
            "data",
            "synth",
            "--out",
            str(tmp_path / "d"),
            "--num-train",
            "8",
            "--num-val",
            "4",
            "--image-size",
            "32",
            "--per-class-train",
            "1",
            "--per-class-val",
            "1",
        ]
    )
    assert len((tmp_path / "d" / "train.jsonl").read_text().splitlines()) == 8
    assert len(list((tmp_path / "d" / "classification" / "val").iterdir())) == 30


def test_data_tasks_writes_questions_and_conversations(tmp_path, capsys):
    out = tmp_path / "d"
    main(["data", "synth", "--out", str(out), "--num-train", "24", "--num-val", "4", "--image-size", "32",
          "--per-class-train", "0", "--per-class-val", "0"])  # fmt: skip
    main(["data", "tasks", "--data", str(out), "--multi-object-chats", "2"])
    printed = capsys.readouterr().out
    assert "train_chat" in printed and "val_vqa" in printed
    scenes = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    chats = [json.loads(line) for line in (out / "train_chat.jsonl").read_text().splitlines()]
    assert len(chats) == sum(2 if len(s["objects"]) > 1 else 1 for s in scenes) > len(scenes)
    assert json.loads((out / "tasks.json").read_text())["multi_object_chats"] == 2


def test_eval_commands_write_clip_benchmark_json(trained, shapes_dir, tmp_path, capsys):
    zs = tmp_path / "zs.json"
    main(
        [
            "eval",
            "zeroshot",
            "--model",
            str(trained),
            "--data",
            str(shapes_dir / "classification" / "val"),
            "--templates",
            "a {}.",
            "--templates",
            "a picture of a {}.",
            "--output",
            str(zs),
        ]
    )
    r = json.loads(zs.read_text())
    m = r["metrics"]
    assert r["task"] == "zeroshot_classification" and m["num_images"] == 30
    # one image per class: top-1 is the mean of the per-class accuracies, and top-5 is at least top-1
    assert m["acc1"] == pytest.approx(sum(m["per_class_accuracy"].values()) / 30)
    assert m["acc5"] >= m["acc1"]
    ret = tmp_path / "ret.json"
    main(
        [
            "eval",
            "retrieval",
            "--model",
            str(trained),
            "--data",
            str(shapes_dir / "val.jsonl"),
            "--output",
            str(ret),
        ]
    )
    r = json.loads(ret.read_text())
    assert r["task"] == "zeroshot_retrieval" and "image_retrieval_recall@5" in r["metrics"]
    lp = tmp_path / "lp.json"
    main(
        [
            "eval",
            "linear-probe",
            "--model",
            str(trained),
            "--train",
            str(shapes_dir / "classification" / "train"),
            "--data",
            str(shapes_dir / "classification" / "val"),
            "--output",
            str(lp),
        ]
    )
    assert json.loads(lp.read_text())["task"] == "linear_probe"


def test_embed_and_classify(trained, shapes_dir, tmp_path, capsys):
    img = next((shapes_dir / "classification" / "val" / "red_circle").iterdir())
    out = tmp_path / "emb.safetensors"
    main(
        [
            "embed",
            "--model",
            str(trained),
            "--image",
            str(img),
            "--text",
            "a red circle",
            "a blue square",
            "--output",
            str(out),
        ]
    )
    from safetensors.torch import load_file

    emb = load_file(str(out))
    assert emb["image_embeds"].shape[0] == 1 and emb["text_embeds"].shape[0] == 2
    assert emb["text_embeds"].norm(dim=-1).sub(1).abs().max() < 1e-4
    capsys.readouterr()
    main(["classify", "--model", str(trained), "--image", str(img), "--labels", "red circle", "blue square"])
    lines = capsys.readouterr().out.strip().splitlines()
    probs = [float(line.split()[0]) for line in lines]
    assert len(lines) == 2 and sum(probs) == pytest.approx(1.0, abs=1e-3) and probs[0] >= probs[1]


def test_embed_precisions_agree_and_stay_unit_norm(trained, shapes_dir, tmp_path):
    from safetensors.torch import load_file

    img = next((shapes_dir / "classification" / "val" / "red_circle").iterdir())
    embs = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / f"{precision}.safetensors"
        main(["embed", "--model", str(trained), "--image", str(img), "--text", "a red circle", "--output", str(out),
              "--precision", precision])  # fmt: skip
        embs[precision] = load_file(str(out))
    for key in ("image_embeds", "text_embeds"):
        fp32, bf16 = embs["fp32"][key], embs["bf16"][key]
        assert fp32.dtype == bf16.dtype == torch.float32
        assert bf16.norm(dim=-1).sub(1).abs().max() < 1e-5  # normalised in float32 after bf16 autocast
        assert torch.nn.functional.cosine_similarity(fp32, bf16).min() > 0.99
        assert not torch.equal(fp32, bf16)  # bf16 really ran


def test_env_prints_machine_and_precision_choice(capsys):
    from vlmkit.runtime import cpu_info, resolve_precision

    main(["env", "--device", "cpu"])
    out = capsys.readouterr().out
    assert cpu_info().model in out and "GFLOP/s" in out
    assert f"precision auto -> {resolve_precision('auto', 'cpu').name}" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--train-data", "no/such/manifest.jsonl", "--out", "{tmp}/r"], "manifest not found"),
        (["train", "--recipe", "no-such-recipe", "--train-data", "x.jsonl"], "unknown recipe"),
        (["train", "--train-data", "{empty}", "--out", "{tmp}/r"], "no usable rows"),
        (["train", "--train-data", "x.jsonl", "--set", "no_such_key=1"], "unknown key 'no_such_key'"),
        (["eval", "zeroshot", "--model", "{tmp}/nope", "--data", "{tmp}"], "model folder not found"),
        (["eval", "zeroshot", "--model", "{trained}", "--data", "{tmp}/missing"], "missing"),
        (["classify", "--model", "{trained}", "--image", "{tmp}/none.png", "--labels", "a"], "none.png"),
        (
            ["eval", "retrieval", "--model", "{trained}", "--data", "{empty}", "--rerank", "8"],
            "needs a model with an ITM head",
        ),
        (["data", "synth", "--out", "{tmp}/b", "--bias", "gender"], "--bias must be one of background"),
        (
            [
                "audit",
                "--model",
                "{trained}",
                "--data",
                "{empty}",
                "--attribute",
                "background",
                "--out",
                "{tmp}/a",
            ],
            "--k is required for a dual encoder",
        ),
        (
            ["data", "synth", "--out", "{tmp}/b", "--bias", "background", "--tiny-fraction", "0.1"],
            "does not apply to --bias",
        ),
    ],
)
def test_user_mistakes_get_one_line_and_exit_2(args, message, tmp_path, trained):
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"image": "gone.png", "caption": "nothing here"}\n')
    args = [a.format(tmp=tmp_path, empty=empty, trained=trained) for a in args]
    r = run_cli(*args)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    err = [line for line in r.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(err) == 1 and message in err[0], r.stderr


def test_audit_writes_json_and_a_report(trained, tmp_path, capsys):
    from vlmkit.data.bias import generate_biased

    paths = generate_biased(
        tmp_path / "bias", num_train=0, num_val=0, num_test=40, image_size=32, progress=False
    )
    out = tmp_path / "audit"
    main(["audit", "--model", str(trained), "--data", str(paths["test"]), "--attribute", "background",
          "--k", "10", "--samples", "50", "--out", str(out)])  # fmt: skip
    r = json.loads((out / "audit.json").read_text())
    assert r["settings"]["k"] == 10 and r["counts"]["images"] == 40 and len(r["model_sha256"]) == 64
    assert set(r["counts"]["groups"].values()) == {4}  # 5 shapes x 2 tints, balanced
    assert (out / "report.html").is_file() and "gap" in capsys.readouterr().out


def test_audit_of_a_captioning_model_reads_what_it_says(tmp_path, capsys):
    """A (random) CoCa folder: `vlmkit audit` captions every image and audits the captions; no --k needed."""
    from vlmkit.data.bias import generate_biased
    from vlmkit.data.tokenizer import Tokenizer
    from vlmkit.data.transforms import PreprocessConfig
    from vlmkit.models.pretrained import save_pretrained
    from vlmkit.models.registry import create_model

    paths = generate_biased(
        tmp_path / "bias", num_train=0, num_val=0, num_test=20, image_size=32, progress=False
    )
    captions = [json.loads(line)["caption"] for line in paths["test"].read_text().splitlines()]
    tok = Tokenizer.train(captions * 5, vocab_size=300, context_length=16)
    coca = create_model("coca-tiny", **{"decoder.vocab_size": tok.vocab_size, "vision.image_size": 32}).eval()
    model = save_pretrained(coca, tmp_path / "coca", tok, PreprocessConfig(image_size=32))
    out = tmp_path / "audit"
    main(["audit", "--model", str(model), "--data", str(paths["test"]), "--attribute", "background",
          "--majority", str(paths["dataset"]), "--samples", "20", "--out", str(out), "--precision", "fp32"])  # fmt: skip
    r = json.loads((out / "audit.json").read_text())
    assert r["task"] == "audit_captions" and r["counts"]["images"] == 20 and len(r["examples"]) == 20
    assert {"accuracy", "gap", "conflict_gap", "majority_named_on_conflicting"} <= set(r["metrics"])
    assert r["settings"]["majority"]["circle"] == "warm"
    # its model card carries the caption audit (a captioning task on the Hub, the caption-specific measures)
    hub = pytest.importorskip("huggingface_hub")
    main(["card", "--model", str(model), "--audit", str(out / "audit.json")])
    card = hub.ModelCard.load(model / "README.md")
    found = {e.metric_type: e for e in card.data.eval_results if e.task_name.startswith("Bias audit")}
    assert found["gap"].task_type == "image-to-text"
    assert found["gap"].metric_value == pytest.approx(round(r["metrics"]["gap"]["value"], 4))
    assert "From the model's own captions" in card.text and "| majority_named_on_conflicting |" in card.text
    assert "Audited: `background` (cool, warm)" in card.text

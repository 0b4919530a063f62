"""Model cards with bias audits and datasheets with computed statistics; both parse with huggingface_hub."""

from __future__ import annotations

import json

import numpy as np
import pytest

hub = pytest.importorskip("huggingface_hub")

from vlmkit.cli.main import main  # noqa: E402
from vlmkit.data.bias import generate_biased  # noqa: E402
from vlmkit.data.datasheet import cramers_v, dataset_stats  # noqa: E402
from vlmkit.errors import ConfigError  # noqa: E402


def test_cramers_v_by_hand():
    assert cramers_v(np.array([[50, 0], [0, 50]])) == pytest.approx(1.0)
    assert cramers_v(np.array([[25, 25], [25, 25]])) == pytest.approx(0.0)
    # 2x2: V = |phi| = |ad - bc| / sqrt((a+b)(c+d)(a+c)(b+d))
    a, b, c, d = 40, 10, 20, 30
    phi = abs(a * d - b * c) / np.sqrt((a + b) * (c + d) * (a + c) * (b + d))
    assert cramers_v(np.array([[a, b], [c, d]])) == pytest.approx(phi)


@pytest.fixture(scope="module")
def biased(tmp_path_factory):
    root = tmp_path_factory.mktemp("cards")
    return generate_biased(
        root / "d", strength=0.9, num_train=100, num_val=0, num_test=40, image_size=32, progress=False
    )


def test_the_datasheet_counts_what_is_in_the_data(biased, tmp_path):
    manifest = tmp_path / "train.jsonl"
    rows = [json.loads(line) for line in biased["train"].read_text().splitlines()]
    for r in rows:
        r["image"] = str(biased["train"].parent / r["image"])
    rows.append(dict(rows[0]))  # the same image and caption again
    rows.append({"image": "missing.png", "caption": "x", "label": "circle", "background": "warm"})
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = dataset_stats(manifest, "background")
    assert (s["rows"], s["usable_rows"], s["skipped_rows"]) == (102, 101, 1)
    assert s["duplicate_captions"] >= 1 and s["images_with_several_captions"] == 1
    first = rows[0]["label"]
    assert s["labels"][first] == 21 and sum(s["labels"].values()) == 101  # 20 a shape, plus the copy
    table = s["label_by_attribute"]
    majority = {"circle": "warm", "diamond": "cool", "square": "warm", "star": "cool", "triangle": "warm"}
    for shape, value in majority.items():  # rho = 0.9 of 20: 18 majority, 2 minority (+1 for the copied row)
        extra = int(shape == first and rows[0]["background"] == value)
        assert table[shape][value] == 18 + extra
    assert s["cramers_v"] > 0.7 and s["captions_naming_value"] == {"cool": 0, "warm": 0}
    assert "generator" not in s  # no dataset.json beside this manifest: nothing is assumed

    out = tmp_path / "DATASHEET.md"
    main(["data", "card", "--data", str(biased["train"]), "--attribute", "background", "--out", str(out)])
    card = hub.DatasetCard.load(out)
    assert card.data.size_categories == ["n<1K"]
    for section in ("## Motivation", "## Composition", "## Collection", "## Preprocessing", "## Uses",
                    "## Distribution", "## Maintenance"):  # fmt: skip
        assert section in card.text
    assert (
        "Cramer's V" in card.text and "strength 0.9" in card.text and "[More Information Needed]" in card.text
    )


def test_the_model_card_carries_the_audit_with_intervals(biased, tmp_path):
    run = tmp_path / "run"
    main(["train", "--recipe", "clip-tiny", "--smoke", "--train-data", str(biased["train"]), "--out", str(run),
          "--set", "max_steps=2", "--set", "model_overrides.vision.stem=patch"])  # fmt: skip
    main(["audit", "--model", str(run), "--data", str(biased["test"]), "--attribute", "background", "--k", "10",
          "--samples", "50", "--out", str(tmp_path / "audit")])  # fmt: skip
    main(["card", "--model", str(run), "--audit", str(tmp_path / "audit" / "audit.json")])
    card = hub.ModelCard.load(run / "README.md")
    audit = json.loads((tmp_path / "audit" / "audit.json").read_text())
    found = {
        r.metric_type: r.metric_value for r in card.data.eval_results if r.task_name.startswith("Bias audit")
    }
    assert found["gap"] == pytest.approx(round(audit["metrics"]["gap"]["value"], 4))
    assert set(found) == {"accuracy", "worst_group_accuracy", "gap", "demographic_parity_difference"}
    text = card.text
    assert "### Bias audit: `background`" in text
    assert (
        "| circle | warm |" not in text and "| circle, warm |" in text
    )  # a "|" in a group name breaks tables
    low, high = audit["per_group"]["circle | warm"]["low"], audit["per_group"]["circle | warm"]["high"]
    assert f"[{low:.3f}, {high:.3f}]" in text  # disaggregated, with intervals
    assert "Audited: `background` (cool, warm)" in text
    # the Hugging Face export carries both: the card with the audit, and the training data's datasheet
    main(
        [
            "export",
            "--model",
            str(run),
            "--out",
            str(tmp_path / "hf"),
            "--audit",
            str(tmp_path / "audit" / "audit.json"),
        ]
    )
    exported = hub.ModelCard.load(tmp_path / "hf" / "README.md")
    assert any(r.task_name.startswith("Bias audit") for r in exported.data.eval_results)
    sheet = hub.DatasetCard.load(tmp_path / "hf" / "DATASHEET.md")
    assert str(biased["train"]) in sheet.text and "| rows | 100 |" in sheet.text
    with pytest.raises(ConfigError, match="not an audit.json"):
        from vlmkit.convert.card import read_audit

        read_audit(biased["test"])

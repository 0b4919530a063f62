"""The audit end to end on hand-made dual encoders: one that ignores the attribute is found unbiased, one that
leans on it is found biased on every measure; the output records what reproduces it; bad input is one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vlmkit.data.transforms import PreprocessConfig
from vlmkit.errors import ConfigError
from vlmkit.eval.audit import audit_dual_encoder
from vlmkit.eval.audit_report import write_audit_report

RAW = PreprocessConfig(image_size=8, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
COLOURS = {"red": (250, 30, 30), "green": (30, 250, 30), "blue": (30, 30, 250)}
TINTS = {"warm": (250, 200, 150), "cool": (150, 200, 250)}


class TintedColourCLIP(torch.nn.Module):
    """Image feature: the object's colour (the 2x2 centre) plus `lean` x (the border's red - blue): with lean > 0
    warm images look redder. Text feature: which colour words a text holds."""

    def __init__(self, lean: float):
        super().__init__()
        self.lean = lean
        self.logit_scale = torch.nn.Parameter(torch.tensor(4.6))

    def encode_image(self, images, normalize=False):
        centre = images[:, :, 3:5, 3:5].mean(dim=(2, 3)) - 0.45  # (B, 3)
        border = images[:, :, 0, 0]  # (B, 3) the tint
        centre[:, 0] += self.lean * (border[:, 0] - border[:, 2])
        return centre

    def encode_text(self, tokens, normalize=False):
        return tokens.float()


def tokenizer(texts):
    return torch.tensor([[t.count(c) for c in COLOURS] for t in texts], dtype=torch.long)  # (B, 3)


@pytest.fixture(scope="module")
def balanced(tmp_path_factory):
    """3 colours x 2 tints x 20 images, the object's brightness jittered (so that ties do not order by file)."""
    root = tmp_path_factory.mktemp("audit")
    rng = np.random.default_rng(0)
    rows = []
    for colour, rgb in COLOURS.items():
        for tint, border in TINTS.items():
            for i in range(20):
                pixels = np.tile(np.array(border, np.uint8), (8, 8, 1))
                pixels[2:6, 2:6] = np.clip(np.array(rgb) * rng.uniform(0.8, 1.0), 0, 255).astype(np.uint8)
                name = f"{colour}-{tint}-{i}.png"
                Image.fromarray(pixels).save(root / name)
                rows.append(
                    {"image": name, "caption": f"a {colour} square", "label": colour, "background": tint}
                )
    rng.shuffle(rows)
    (root / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "test.jsonl"


def run(model, data, **kw):
    return audit_dual_encoder(model, tokenizer, RAW, data, "background", k=10, samples=200, **kw)


def test_a_model_that_ignores_the_attribute_is_found_unbiased(balanced):
    r = run(TintedColourCLIP(lean=0.0), balanced)
    m = r["metrics"]
    assert m["gap"]["value"] == 0.0 and m["accuracy"]["value"] == 1.0
    assert m["demographic_parity_difference"]["value"] < 0.15
    for side in ("image", "text"):  # the probe does no better than chance (0.5): the interval covers it
        assert m[f"leakage/{side}"]["low"] <= 0.5 + 0.05 and r["chance"][f"leakage/{side}"] == 0.5
    assert m["max_skew@10/uniform"]["low"] < 0.3


def test_a_model_that_leans_on_the_attribute_is_found_biased_everywhere(balanced):
    r = run(TintedColourCLIP(lean=3.0), balanced)
    m = r["metrics"]
    assert m["gap"]["low"] > 0.2 and r["worst_group"] in ("blue | warm", "green | warm")
    assert m["demographic_parity_difference"]["value"] > 0.3
    assert m["leakage/image"]["low"] > 0.9
    assert m["leakage/text"]["high"] < 0.75  # the captions never name the tint
    assert m["max_skew@10/uniform"]["low"] > 0.4  # "a red" retrieves warm images
    for name in ("gap", "max_skew@10/uniform", "ndkl@10/proportional", "equalized_odds_difference"):
        assert m[name]["low"] <= m[name]["value"] <= m[name]["high"]


def test_the_output_records_what_reproduces_it_and_the_report_is_written(balanced, tmp_path):
    r = run(
        TintedColourCLIP(lean=3.0), balanced, templates=["a picture of a {}."], seed=7, model_sha256="abc"
    )
    s = r["settings"]
    assert s["k"] == 10 and s["templates"] == ["a picture of a {}."] and s["seed"] == 7
    assert s["queries"] == ["a picture of a blue.", "a picture of a green.", "a picture of a red."]
    assert s["targets"]["uniform"] == {"cool": 0.5, "warm": 0.5} and s["bootstrap_samples"] == 200
    assert r["model_sha256"] == "abc" and r["counts"]["images"] == 120
    assert r["counts"]["groups"] == {f"{c} | {t}": 20 for c in sorted(COLOURS) for t in sorted(TINTS)}
    json.dumps(r)  # JSON-able throughout
    again = run(
        TintedColourCLIP(lean=3.0), balanced, templates=["a picture of a {}."], seed=7, model_sha256="abc"
    )
    assert again == r  # the same seed gives the same intervals
    page = write_audit_report(r, tmp_path / "report")
    text = page.read_text()
    assert "blue | warm" in text or "green | warm" in text
    for png in ("group_accuracy.png", "skew_per_query.png", "leakage.png"):
        assert (tmp_path / "report" / png).stat().st_size > 1000


def test_bad_input_is_one_line(balanced, tmp_path):
    with pytest.raises(ConfigError, match=r"--k must be an integer in \[1, 120\].*never defaulted"):
        audit_dual_encoder(TintedColourCLIP(0.0), tokenizer, RAW, balanced, "background", k=121)
    one = tmp_path / "one.jsonl"
    lines = balanced.read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    for row in rows:
        row["image"] = str(balanced.parent / row["image"])
        row["background"] = "warm"
    one.write_text("".join(json.dumps(row) + "\n" for row in rows))
    from vlmkit.errors import DataError

    with pytest.raises(DataError, match="same 'background'"):
        audit_dual_encoder(TintedColourCLIP(0.0), tokenizer, RAW, one, "background", k=5)
    with pytest.raises(DataError, match="no row has an image, a caption, 'label' and 'gender'"):
        audit_dual_encoder(TintedColourCLIP(0.0), tokenizer, RAW, balanced, "gender", k=5)


# ---------------------------------------------------------------- mitigation


class TextBiasedCLIP(torch.nn.Module):
    """Images: the object's colour and, in a 4th dimension, how warm the background is. Texts: colour words on
    their axes, "warm"/"cool" on the 4th (+1/-1), and a biased text side: "red" also points to warm."""

    def __init__(self, lean: float = 3.0, beta: float = 2.0):
        super().__init__()
        self.lean, self.beta = lean, beta
        self.logit_scale = torch.nn.Parameter(torch.tensor(4.6))

    def encode_image(self, images, normalize=False):
        centre = images[:, :, 3:5, 3:5].mean(dim=(2, 3)) - 0.45  # (B, 3)
        border = images[:, :, 0, 0]
        return torch.cat([centre, self.lean * (border[:, :1] - border[:, 2:3])], dim=1)  # (B, 4)

    def encode_text(self, tokens, normalize=False):
        f = tokens[:, :4].float().clone()  # red, green, blue, warm - cool
        f[:, 3] += self.beta * f[:, 0]
        return f


def tinted_tokenizer(texts):
    words = [
        [t.count("red"), t.count("green"), t.count("blue"), t.count("warm") - t.count("cool")] for t in texts
    ]
    return torch.tensor(words, dtype=torch.long)


def test_mitigations_are_measured_before_and_after_on_the_same_draws(balanced):
    from vlmkit.eval.audit import Mitigation

    r = audit_dual_encoder(
        TextBiasedCLIP(), tinted_tokenizer, RAW, balanced, "background", k=10, samples=200,
        mitigation=Mitigation(names=("projection", "sfid"), fit_data=str(balanced), sfid_dims=1),
    )  # fmt: skip
    m, after = r["metrics"], r["mitigations"]
    assert m["gap"]["value"] > 0.4 and m["leakage/image"]["value"] > 0.95  # biased to start with
    # the projection removes the warm/cool direction from the class and query embeddings: the zero-shot bias goes
    p = after["projection"]
    assert p["metrics"]["gap"]["value"] == 0.0 and p["accuracy_cost"] < 0 and "gap" not in p["worse"]
    assert p["metrics"]["leakage/image"]["value"] == m["leakage/image"]["value"]  # images untouched
    assert p["change"]["gap"] == pytest.approx(-m["gap"]["value"])
    # SFID finds the image dimension that says the tint and replaces it: the images stop leaking it
    s = after["sfid"]
    assert s["metrics"]["leakage/image"]["value"] < 0.7 and s["metrics"]["gap"]["value"] < m["gap"]["value"]
    assert list(r["settings"]["mitigation"]["names"]) == ["projection", "sfid"]
    json.dumps(r)


def test_the_image_measured_projection_removes_a_bias_that_lives_in_the_images(balanced):
    """The tint direction measured on labelled images (within each colour, warm minus cool) is the 4th axis here;
    projected out of both sides, the images stop leaking the tint and zero-shot stops leaning on it."""
    from vlmkit.eval.audit import Mitigation

    r = audit_dual_encoder(
        TextBiasedCLIP(), tinted_tokenizer, RAW, balanced, "background", k=10, samples=200,
        mitigation=Mitigation(names=("projection-images",), fit_data=str(balanced)),
    )  # fmt: skip
    p = r["mitigations"]["projection-images"]
    assert r["metrics"]["gap"]["value"] > 0.4 and r["metrics"]["leakage/image"]["value"] > 0.95
    assert p["metrics"]["gap"]["value"] == 0.0 and p["accuracy_cost"] < 0
    assert p["metrics"]["leakage/image"]["value"] < 0.7  # the projection reaches the image side
    with pytest.raises(ConfigError, match="projection-images .* --fit-data"):
        audit_dual_encoder(
            TextBiasedCLIP(), tinted_tokenizer, RAW, balanced, "background", k=10,
            mitigation=Mitigation(names=("projection-images",)),
        )  # fmt: skip


def test_a_mitigation_that_makes_bias_worse_is_reported_as_such(balanced):
    """SFID on a model that ignores the tint: the image dimension the forest finds most tint-predictive is a
    colour axis, and replacing it makes some colours unrecognisable: the gap rises and is flagged."""
    from vlmkit.eval.audit import Mitigation

    r = audit_dual_encoder(
        TintedColourCLIP(lean=0.0), tokenizer, RAW, balanced, "background", k=10, samples=100,
        mitigation=Mitigation(names=("sfid",), fit_data=str(balanced), sfid_dims=1),
    )  # fmt: skip
    s = r["mitigations"][
        "sfid"
    ]  # an unbiased model: removing its most tint-predictive dimension costs accuracy
    assert s["accuracy_cost"] > 0.2 and r["metrics"]["gap"]["value"] == 0.0
    assert "gap" in s["worse"]


def test_sfid_needs_fit_data(balanced):
    from vlmkit.eval.audit import Mitigation

    with pytest.raises(ConfigError, match="--fit-data"):
        audit_dual_encoder(
            TintedColourCLIP(0.0),
            tokenizer,
            RAW,
            balanced,
            "background",
            k=5,
            mitigation=Mitigation(names=("sfid",)),
        )


def test_the_signed_conflict_gap_is_zero_without_bias_and_large_with_it(balanced):
    majority = {"red": "warm", "green": "cool", "blue": "cool"}
    fair = run(TintedColourCLIP(lean=0.0), balanced, majority=majority)["metrics"]["conflict_gap"]
    assert fair["value"] == 0.0 and fair["low"] <= 0.0 <= fair["high"]
    r = run(TintedColourCLIP(lean=3.0), balanced, majority=majority)
    assert r["metrics"]["conflict_gap"]["low"] > 0.5 and r["settings"]["majority"] == majority
    with pytest.raises(ConfigError, match="--majority names no value for the label 'red'"):
        run(TintedColourCLIP(lean=0.0), balanced, majority={"green": "cool", "blue": "cool"})


def test_an_image_folder_with_a_metadata_file_is_audited(balanced, tmp_path):
    """Users' own data as Hugging Face's imagefolder: class subfolders, metadata.csv with file_name and the
    attribute. No captions: no text leakage is reported (rather than a made-up one)."""
    import csv
    import shutil

    rows = [json.loads(line) for line in balanced.read_text().splitlines()]
    root = tmp_path / "folder"
    with open(tmp_path / "meta.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file_name", "background"])
        for i, r in enumerate(rows):
            (root / r["label"]).mkdir(parents=True, exist_ok=True)
            shutil.copy(balanced.parent / r["image"], root / r["label"] / f"{i}.png")
            w.writerow([f"{r['label']}/{i}.png", r["background"] if i else ""])  # row 1 lacks the attribute
    shutil.move(tmp_path / "meta.csv", root / "metadata.csv")
    r = audit_dual_encoder(TintedColourCLIP(lean=3.0), tokenizer, RAW, root, "background", k=10, samples=50)
    assert r["counts"]["images"] == 119 and r["counts"]["bad_rows"] == 1
    assert r["settings"]["classes"] == ["blue", "green", "red"]  # from the subfolders
    assert "leakage/text" not in r["metrics"] and r["metrics"]["gap"]["value"] > 0.3
    write_audit_report(r, tmp_path / "report")
    from vlmkit.errors import DataError

    with pytest.raises(DataError, match="has no metadata.jsonl or metadata.csv"):
        audit_dual_encoder(TintedColourCLIP(0.0), tokenizer, RAW, tmp_path / "report", "background", k=5)


def test_captions_are_audited_by_group_and_by_what_they_say_of_the_attribute():
    from vlmkit.eval.audit import audit_captions

    labels = ["circle"] * 4 + ["star"] * 4
    values = ["warm", "warm", "cool", "cool", "cool", "cool", "warm", "warm"]
    majority = {"circle": "warm", "star": "cool"}
    captions = [
        "a red circle on a warm background",  # aligned, right
        "two circles",  # aligned, right (plural)
        "a circle on a warm background",  # conflicting: right shape, names the majority tint (wrong)
        "a star",  # conflicting: wrong shape
        "a star on a cool background",  # aligned, right
        "a blue STAR",  # aligned, right (any case)
        "a circle on a cool background",  # conflicting: wrong shape, names the majority tint
        "a starfish",  # conflicting: "star" is not named as a word
    ]
    r = audit_captions(captions, labels, values, majority, samples=100)
    m = r["metrics"]
    assert m["accuracy"]["value"] == 5 / 8
    assert r["per_group"]["circle | cool"]["value"] == 0.5 and r["per_group"]["star | warm"]["value"] == 0.0
    assert m["conflict_gap"]["value"] == 1.0 - 1 / 4
    assert (
        m["majority_named_on_conflicting"]["value"] == 2 / 4
        and m["majority_named_on_aligned"]["value"] == 2 / 4
    )
    assert m["attribute_named"]["value"] == 4 / 8
    assert r["examples"][0]["caption"] == captions[0]

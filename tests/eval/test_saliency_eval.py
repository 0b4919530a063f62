"""`vlmkit eval saliency`: queries from scene metadata, the class-sensitive pointing game and the controls on
hand-made maps, a map whose right answer is known by construction, and the command end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vlmkit.cli.main import main
from vlmkit.errors import DataError
from vlmkit.eval import saliency_eval
from vlmkit.eval.saliency import similarity_map, to_image_size
from vlmkit.eval.saliency_eval import (
    DualEncoderMaps,
    _hit_share,
    class_sensitive_hit,
    evaluate_saliency,
    queries,
    query_text,
    read_scenes,
)
from vlmkit.models.registry import create_model


def _obj(colour, shape, box):
    return {"colour": colour, "shape": shape, "size": "small", "box": box}


def test_queries_ask_about_objects_no_other_object_shares():
    scenes = [
        {"image": "a.png", "line": 1, "objects": [_obj("red", "circle", [0, 0, 5, 5])]},  # one object: none
        {
            "image": "b.png",
            "line": 2,
            "objects": [
                _obj("red", "circle", [0, 0, 5, 5]),
                _obj("red", "circle", [9, 9, 14, 14]),
                _obj("blue", "star", [20, 0, 25, 5]),
            ],
        },  # fmt: skip
        {
            "image": "c.png",
            "line": 3,
            "objects": [_obj("red", "circle", [0, 0, 5, 5]), _obj("red", "square", [9, 9, 14, 14])],
        },  # fmt: skip
    ]
    qs = queries(scenes)
    assert [(q["line"], q["text"], q["group"]) for q in qs] == [
        (2, "a blue star.", "3+"),
        (3, "a red circle.", "2"),
        (3, "a red square.", "2"),
    ]
    assert qs[0]["others"] == [[0, 0, 5, 5], [9, 9, 14, 14]]
    # the question a generative model is asked: by the shape when it is the scene's alone, else by the colour
    assert (qs[0]["question"], qs[0]["answer"]) == ("what colour is the star?", "blue")
    assert (qs[1]["question"], qs[1]["answer"]) == ("what colour is the circle?", "red")
    two_circles = [_obj("red", "circle", [0, 0, 5, 5]), _obj("blue", "circle", [9, 9, 14, 14])]
    asked = queries([{"image": "d.png", "line": 4, "objects": two_circles}])
    assert [(q["question"], q["answer"]) for q in asked] == [("what shape is the red object?", "circle"),
                                                              ("what shape is the blue object?", "circle")]  # fmt: skip
    assert queries(scenes, usable=lambda q: q["group"] == "2") == qs[1:]
    assert len(queries(scenes, limit=1)) == 2  # one per group
    assert query_text(_obj("orange", "diamond", [0, 0, 1, 1])) == "an orange diamond."


def test_class_sensitive_pointing_on_hand_made_maps():
    a, b = [2, 2, 8, 8], [12, 2, 18, 8]
    m = np.zeros((20, 20))
    m[5, 5] = 1  # inside A
    assert class_sensitive_hit(m, a, [b], tolerance=1.0) and not class_sensitive_hit(m, b, [a], tolerance=1.0)
    m = np.zeros((20, 20))
    m[5, 10] = 1  # between them: 3 px from A's right edge (x=7), 2 px from B's left (x=12)
    assert class_sensitive_hit(m, b, [a], tolerance=2.0)
    assert not class_sensitive_hit(m, a, [b], tolerance=5.0)  # within A's tolerance but nearer B
    assert not class_sensitive_hit(m, b, [a], tolerance=1.0)  # nearer B but beyond the tolerance


def test_a_random_points_share_counted_by_hand():
    # 10 x 10 image, tolerance 0: box A holds 2 x 5 = 10 pixels; B, far away, does not change A's share
    hit, sensitive = _hit_share([0, 0, 5, 2], [[6, 6, 10, 10]], (10, 10), 0.0)
    assert hit == pytest.approx(0.10) and sensitive == pytest.approx(0.10)
    # tolerance 1: the 5 x 2 box grows by a ring of 1 px (4-neighbourhood plus diagonals at distance sqrt(2) > 1)
    hit, _ = _hit_share([2, 2, 7, 4], [], (10, 10), 1.0)
    assert hit == pytest.approx((10 + 2 * 5 + 2 * 2) / 100)
    # an adjacent B with a 1 px tolerance: pixels of B's box are 0 from B, never counted for A
    _, sensitive = _hit_share([0, 0, 5, 2], [[0, 2, 5, 4]], (10, 10), 1.0)
    assert sensitive == pytest.approx(12 / 100)  # A's 10 pixels and x=5 at y=0, 1 (the row y=2 is B's own)


def test_read_scenes_names_the_bad_line(tmp_path):
    p = tmp_path / "s.jsonl"
    p.write_text('{"image": "a.png", "objects": [{"colour": "red", "shape": "circle", "box": [0,0,1,1]}]}\n'
                 '{"image": "b.png", "caption": "x"}\n')  # fmt: skip
    with pytest.raises(DataError, match=r"s\.jsonl:2: a row needs 'image' and 'objects'"):
        read_scenes(p)
    with pytest.raises(DataError, match="file not found"):
        read_scenes(tmp_path / "none.jsonl")


def test_a_map_whose_answer_is_known_by_construction_points_at_the_red_square():
    """A tower whose tokens see only their own patch (no positions, blocks that add nothing): the text embedding
    is a red patch's token from another image, so the similarity map must peak on the red square."""
    torch.manual_seed(0)
    clip = create_model("clip-tiny", **{"vision.image_size": 32, "vision.layers": 1}).eval()
    with torch.no_grad():
        clip.visual.positional_embedding.zero_()
        for block in clip.visual.transformer.blocks:
            for lin in (block.attn.proj, block.mlp.fc2):
                lin.weight.zero_()
                lin.bias.zero_()
    red = torch.tensor([1.5, -1.0, -1.0])[:, None, None]
    grey = torch.tensor([0.5, 0.5, 0.5])[:, None, None]
    image = grey.expand(3, 32, 32).clone()
    image[:, 8:16, 16:24] = red  # the patch at row 1, column 2 of the 4 x 4 grid
    probe = grey.expand(3, 32, 32).clone()
    probe[:, 24:32, 0:8] = red  # a red patch elsewhere, for the text embedding
    with torch.no_grad():
        tokens = clip.visual.forward_tokens(probe[None])
        text = clip.visual.proj(tokens[:, 1 + 3 * 4 + 0])  # (1, D): the probe's red patch token
    sal = to_image_size(similarity_map(clip, image[None], text), (32, 32))[0].numpy()
    y, x = np.unravel_index(int(sal.argmax()), sal.shape)
    assert 16 <= x < 24 and 8 <= y < 16
    assert class_sensitive_hit(sal, [16, 8, 24, 16], [[0, 24, 8, 32]], tolerance=0.0)


def _scenes(tmp_path, n=6, size=32):
    from vlmkit.data.synthetic import render_scene

    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        image, meta = render_scene(rng, image_size=size, num_objects=2 + i % 2)
        image.save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "caption": "x", "objects": meta["objects"]}))
    path = tmp_path / "scenes.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("aim", ["asked", "other"])
def test_the_scores_of_an_oracle_and_of_a_map_pointing_at_the_other_object(tmp_path, monkeypatch, aim):
    from vlmkit.data.transforms import PreprocessConfig

    path = _scenes(tmp_path)
    qs = queries(read_scenes(path))
    served = iter(qs)

    def oracle(clip, pixels, text, method):  # a peak on the asked (or the first other) object's box centre
        maps = []
        for _ in range(pixels.shape[0]):
            q = next(served)
            x0, y0, x1, y1 = q["box"] if aim == "asked" else q["others"][0]
            ys, xs = np.mgrid[0:32, 0:32]
            maps.append(np.exp(-((xs - (x0 + x1 - 1) / 2) ** 2 + (ys - (y0 + y1 - 1) / 2) ** 2) / 8.0))
        return torch.tensor(np.stack(maps), dtype=torch.float32)

    monkeypatch.setattr(saliency_eval, "explain_dual_encoder", oracle)
    torch.manual_seed(0)
    clip = create_model("clip-tiny", **{"vision.image_size": 32, "vision.layers": 1, "text.layers": 1})
    tokenizer = lambda texts: torch.randint(1, 100, (len(texts), 16))  # noqa: E731
    provider = DualEncoderMaps(clip, tokenizer, PreprocessConfig(image_size=32))
    res = evaluate_saliency(provider, path, ["similarity"], deletion_limit=2, random_init=False, batch_size=4)
    rows = {r["method"]: r for r in res["metrics"]["rows"]}
    expected = 1.0 if aim == "asked" else 0.0
    assert rows["similarity"]["class_sensitive_2"] == expected
    assert rows["similarity"]["class_sensitive_3+"] == expected
    # the controls: a random point's expected score, counted independently, and the centre
    shares = [_hit_share(q["box"], q["others"], (32, 32), 15 * 32 / 224) for q in qs]
    assert rows["random point"]["pointing"] == pytest.approx(np.mean([s[0] for s in shares]))
    assert rows["uniform map"]["iou"] == pytest.approx(
        np.mean([(q["box"][2] - q["box"][0]) * (q["box"][3] - q["box"][1]) / 32**2 for q in qs])
    )
    assert 0 <= rows["centre point"]["class_sensitive_2"] <= 1
    assert rows["similarity"]["deletion_auc"] is not None and rows["random point"]["deletion_auc"] is None


def test_vlmkit_eval_saliency_writes_every_methods_row_and_the_controls(tmp_path):
    from vlmkit.data.tokenizer import Tokenizer
    from vlmkit.data.transforms import PreprocessConfig
    from vlmkit.models.pretrained import save_pretrained

    path = _scenes(tmp_path)
    tok = Tokenizer.train(["a red circle", "a blue square"] * 10, vocab_size=300, context_length=16)
    torch.manual_seed(0)
    clip = create_model("clip-tiny", **{"vision.image_size": 32, "vision.layers": 2, "text.layers": 1,
                                        "text.vocab_size": tok.vocab_size, "text.context_length": 16,
                                        "text.eot_token_id": tok.eot_token_id})  # fmt: skip
    folder = save_pretrained(clip, tmp_path / "m", tok, PreprocessConfig(image_size=32))
    main(["eval", "saliency", "--model", str(folder), "--data", str(path), "--deletion-limit", "2",
          "--out", str(tmp_path / "o")])  # fmt: skip
    res = json.loads((tmp_path / "o" / "saliency.json").read_text())
    pairs = [(r["method"], r["model"]) for r in res["metrics"]["rows"]]
    for m in ("similarity", "rollout", "relevance", "gradcam"):
        assert (m, "trained") in pairs and (m, "random init") in pairs
    for control in ("centre point", "random point", "uniform map"):
        assert (control, "control") in pairs
    assert (tmp_path / "o" / "report.html").is_file() and (tmp_path / "o" / "examples.png").is_file()
    with pytest.raises(SystemExit):  # argparse refuses an unknown method
        main(["eval", "saliency", "--model", str(folder), "--data", str(path), "--method", "nope"])


def test_scenes_without_a_second_object_are_refused_in_one_line(tmp_path):
    from vlmkit.data.transforms import PreprocessConfig

    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    p = tmp_path / "s.jsonl"
    p.write_text(json.dumps({"image": "a.png", "objects": [_obj("red", "circle", [0, 0, 5, 5])]}) + "\n")
    clip = create_model("clip-tiny", **{"vision.image_size": 32, "vision.layers": 1, "text.layers": 1})
    with pytest.raises(DataError, match="no scene of two or more objects"):
        evaluate_saliency(DualEncoderMaps(clip, None, PreprocessConfig(image_size=32)), p)

"""Image search indexes: top-k equals a brute-force cosine ranking, bad files are skipped and counted, an
interrupted build resumes to the same index, and `vlmkit index build` writes one."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vlmkit.data.transforms import PreprocessConfig
from vlmkit.inference.index import ImageIndex, build_index
from vlmkit.models.registry import create_model


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return create_model("clip-tiny", **{"vision.image_size": 32, "vision.layers": 1, "vision.width": 32,
                                        "vision.heads": 2, "embed_dim": 16}).eval()  # fmt: skip


@pytest.fixture()
def images(tmp_path):
    root = tmp_path / "images"
    (root / "a").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(11):
        Image.fromarray(rng.integers(0, 255, (32, 20 + i, 3), dtype=np.uint8)).save(
            root / ("a" if i % 2 else ".") / f"{i}.png"
        )
    (root / "a" / "zero.jpg").write_bytes(b"")
    (root / "notes.txt").write_text("not an image")
    return root


def test_search_equals_brute_force_cosine_and_bad_files_are_counted(clip, images, tmp_path):
    meta = build_index(
        clip, PreprocessConfig(image_size=32), images, tmp_path / "idx", model_path="m", progress=False
    )
    assert meta["count"] == 11 and [s["path"] for s in meta["skipped"]] == ["a/zero.jpg"]
    index = ImageIndex.load(tmp_path / "idx")
    np.testing.assert_allclose(np.linalg.norm(index.embeddings, axis=1), 1, atol=1e-5)
    queries = torch.nn.functional.normalize(torch.randn(3, 16), dim=-1)
    scores, ids = index.search(queries, k=4)
    brute = queries.numpy() @ index.embeddings.T  # (3, N) cosine similarities
    for q in range(3):
        best = np.argsort(-brute[q])[:4]
        assert ids[q].tolist() == best.tolist()
        np.testing.assert_allclose(scores[q], brute[q, best], atol=1e-5)
    assert index.search(queries, k=100)[1].shape == (3, 11)
    assert all((images / p).is_file() for p in index.paths)
    assert not (tmp_path / "idx" / "parts").exists() and not (tmp_path / "idx" / "build.json").exists()


def test_an_interrupted_build_resumes_where_it_stopped(clip, images, tmp_path, monkeypatch):
    import vlmkit.inference.index as index_module

    whole = build_index(
        clip, PreprocessConfig(image_size=32), images, tmp_path / "whole", chunk=3, progress=False
    )
    real, calls = index_module.encode_images, []

    def crash_on_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(index_module, "encode_images", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        build_index(
            clip, PreprocessConfig(image_size=32), images, tmp_path / "resumed", chunk=3, progress=False
        )
    state = json.loads((tmp_path / "resumed" / "build.json").read_text())
    assert len(state["parts"]) == 2
    monkeypatch.setattr(index_module, "encode_images", real)
    counted = []
    monkeypatch.setattr(
        index_module, "encode_images", lambda m, x, *a, **k: counted.append(len(x)) or real(m, x, *a, **k)
    )
    resumed = build_index(
        clip, PreprocessConfig(image_size=32), images, tmp_path / "resumed", chunk=3, progress=False
    )
    assert sum(counted) == 12 - 6 - 1  # 12 files, 6 done before the crash, zero.jpg skipped
    assert resumed["paths"] == whole["paths"]
    np.testing.assert_allclose(ImageIndex.load(tmp_path / "resumed").embeddings,
                               ImageIndex.load(tmp_path / "whole").embeddings, atol=1e-6)  # fmt: skip


def test_vlmkit_index_build(clip, images, tmp_path, capsys):
    from vlmkit.cli import main
    from vlmkit.data.tokenizer import Tokenizer
    from vlmkit.models.pretrained import save_pretrained

    tok = Tokenizer.train(["a red circle", "a blue square"] * 10, vocab_size=300, context_length=16)
    folder = save_pretrained(clip, tmp_path / "clip", tok, PreprocessConfig(image_size=32))
    main(["index", "build", "--model", str(folder), "--images", str(images), "--out", str(tmp_path / "i"),
          "--precision", "fp32"])  # fmt: skip
    assert "11 images, 16-dim embeddings, 1 skipped" in capsys.readouterr().out
    assert len(ImageIndex.load(tmp_path / "i")) == 11

"""Attention maps from the nn blocks, rollout and relevance against hand-computed two-layer cases, the dual-encoder
saliency methods and `vlmkit explain`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vlmkit.cli.main import main
from vlmkit.eval.saliency import METHODS, attention_rollout, explain_dual_encoder, relevance, similarity_map
from vlmkit.models.registry import create_model
from vlmkit.nn.attention import attention, record_attention


def test_recording_returns_the_same_output_and_row_stochastic_maps():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 8)
    plain = attention(q, k, v, is_causal=True)
    with record_attention() as maps:
        recorded = attention(q, k, v, is_causal=True)
    assert torch.allclose(plain, recorded, atol=1e-5)
    (w,) = maps
    assert w.shape == (2, 3, 5, 5) and torch.allclose(w.sum(-1), torch.ones(2, 3, 5))
    assert (w.triu(1) == 0).all()  # causal
    assert attention(q, k, v) is not None and len(maps) == 1  # nothing recorded after the block


def test_a_vit_records_every_block_including_the_pooled_last_one():
    torch.manual_seed(0)
    clip = create_model("clip-tiny", **{"vision.image_size": 32, "vision.layers": 3}).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), record_attention() as maps:
        clip.encode_image(pixels)
    T = (32 // 8) ** 2 + 1
    assert len(maps) == 3 and maps[0].shape == (2, 2, T, T)
    assert maps[-1].shape[-1] == T  # the last block: the class token's row (or the full map)
    r = attention_rollout(list(maps))
    assert r.shape == (2, T) and torch.allclose(r.sum(-1), torch.ones(2), atol=1e-5)


def test_rollout_by_hand_on_two_layers():
    a1 = torch.tensor([[[0.5, 0.5, 0.0], [0.2, 0.8, 0.0], [0.0, 0.0, 1.0]]])[:, None]  # (1, 1, 3, 3)
    a2 = torch.tensor([[[0.0, 1.0, 0.0], [0.3, 0.3, 0.4], [0.5, 0.0, 0.5]]])[:, None]
    # by hand: A' = (A + I) / 2 (rows already sum to 1), rollout = A2' @ A1', the class token's row
    b1 = torch.tensor([[0.75, 0.25, 0.0], [0.1, 0.9, 0.0], [0.0, 0.0, 1.0]])
    b2 = torch.tensor([[0.5, 0.5, 0.0], [0.15, 0.65, 0.2], [0.25, 0.0, 0.75]])
    expected = (b2 @ b1)[0]
    assert torch.allclose(attention_rollout([a1, a2])[0], expected)
    # normalising columns instead (the known bug) gives another answer
    wrong = [(0.5 * a[0, 0] + 0.5 * torch.eye(3)) for a in (a1, a2)]
    wrong = [w / w.sum(0, keepdim=True) for w in wrong]
    assert not torch.allclose((wrong[1] @ wrong[0])[0], expected)


def test_relevance_by_hand_on_two_layers():
    torch.manual_seed(0)
    a1 = torch.rand(1, 2, 3, 3).softmax(-1).requires_grad_()
    a2 = torch.rand(1, 2, 3, 3).softmax(-1).requires_grad_()
    w = torch.randn(3)
    score = ((a2[0].mean(0) @ a1[0].mean(0))[0] * w).sum()  # any differentiable score of both maps
    for a in (a1, a2):
        a.retain_grad()
    score.backward()
    cams = [(a.grad * a).clamp(min=0).mean(1)[0] for a in (a1, a2)]
    R = torch.eye(3)
    R = R + cams[0] @ R
    R = R + cams[1] @ R
    assert torch.allclose(relevance([a1, a2])[0], R[0].detach())


def test_relevance_of_a_clip_similarity_through_the_recorded_maps():
    torch.manual_seed(0)
    clip = create_model("clip-tiny", **{"vision.image_size": 32, "vision.layers": 2}).eval()
    pixels = torch.randn(1, 3, 32, 32)
    text = clip.encode_text(torch.randint(3, 100, (1, 8)), normalize=True).detach()
    with record_attention(retain_grad=True) as maps:
        score = (clip.encode_image(pixels, normalize=True) * text).sum()
    score.backward()
    assert all(m.grad is not None for m in maps)
    r = relevance(list(maps))
    assert r.shape == (1, 17) and r[0, 0] >= 1.0  # the identity's share of the class token itself


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    from vlmkit.data.tokenizer import Tokenizer
    from vlmkit.data.transforms import PreprocessConfig
    from vlmkit.models.pretrained import save_pretrained

    tok = Tokenizer.train(["a red circle", "a blue square"] * 10, vocab_size=300, context_length=16)
    torch.manual_seed(0)
    clip = create_model("clip-tiny", **{"vision.image_size": 32, "vision.layers": 2, "text.layers": 1,
                                        "text.vocab_size": tok.vocab_size, "text.context_length": 16,
                                        "text.eot_token_id": tok.eot_token_id})  # fmt: skip
    return save_pretrained(clip, tmp_path_factory.mktemp("clip") / "m", tok, PreprocessConfig(image_size=32))


@pytest.mark.parametrize("method", METHODS)
def test_vlmkit_explain_writes_a_map_of_the_images_size(clip_folder, tmp_path, method):
    img = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(img)
    main(["explain", "--model", str(clip_folder), "--image", str(img), "--text", "a red circle",
          "--method", method, "--out", str(tmp_path / "o")])  # fmt: skip
    sal = np.load(tmp_path / "o" / "saliency.npy")
    assert sal.shape == (40, 50) and np.isfinite(sal).all() and sal.min() == 0 and sal.max() == 1
    assert (tmp_path / "o" / "overlay.png").is_file()


def test_methods_through_the_class_token_refuse_other_pooling_in_one_line(clip_folder):
    from vlmkit.errors import ConfigError

    torch.manual_seed(0)
    siglip = create_model("siglip-tiny", **{"vision.image_size": 32, "vision.layers": 1})
    with pytest.raises(ConfigError, match="pools by 'attn'"):
        explain_dual_encoder(
            siglip, torch.randn(1, 3, 32, 32), torch.randn(1, siglip.cfg.embed_dim), "rollout"
        )
    m = explain_dual_encoder(
        siglip, torch.randn(1, 3, 32, 32), torch.randn(1, siglip.cfg.embed_dim), "gradcam"
    )
    assert m.shape == (1, 4, 4)


def test_the_similarity_map_is_each_patch_tokens_cosine_with_the_text():
    torch.manual_seed(0)
    clip = create_model("clip-tiny", **{"vision.image_size": 32, "vision.layers": 1}).eval()
    pixels, text = torch.randn(1, 3, 32, 32), torch.randn(1, clip.cfg.embed_dim)
    with torch.no_grad():
        tokens = clip.visual.forward_tokens(pixels)[0, 1:].double()
        emb = tokens @ clip.visual.proj.weight.double().T
    expected = (torch.nn.functional.cosine_similarity(emb, text.double(), dim=-1)).view(4, 4)
    assert torch.allclose(similarity_map(clip, pixels, text)[0].double(), expected, atol=1e-5)


def test_the_pointing_game_and_box_iou_on_hand_made_maps():
    from vlmkit.eval.saliency import baseline_hits, box_iou, pointing_hit, tolerance_for

    s = np.zeros((64, 64))
    s[10, 50] = 1.0  # the maximum at x=50, y=10
    assert pointing_hit(s, (45, 5, 55, 15), tolerance=0)
    assert not pointing_hit(s, (0, 40, 20, 60), tolerance=0)
    assert pointing_hit(s, (45, 14, 55, 20), tolerance=4) and not pointing_hit(
        s, (45, 14, 55, 20), tolerance=3
    )
    assert tolerance_for(224) == 15 and tolerance_for(64) == pytest.approx(15 * 64 / 224)
    block = np.zeros((10, 10))
    block[2:6, 2:6] = 1.0  # 16 pixels; the box covers them and 16 more
    assert box_iou(block, (2, 2, 6, 10)) == pytest.approx(16 / 32)
    base = baseline_hits((0, 0, 5, 10), (10, 10), tolerance=0)
    assert base == {"centre": 0.0, "random": 0.5}
    assert baseline_hits((3, 3, 7, 7), (10, 10), tolerance=0)["centre"] == 1.0


def test_deletion_and_insertion_reward_the_map_that_finds_what_the_score_reads():
    from vlmkit.eval.saliency import deletion_insertion

    pixels = torch.ones(3, 8, 8)
    baseline = torch.zeros(3, 8, 8)

    def score(x):  # the score reads the top-left 2x2 block only
        return x[:, :, :2, :2].mean(dim=(1, 2, 3))

    right = torch.zeros(8, 8)
    right[:2, :2] = 1.0
    wrong = torch.zeros(8, 8)
    wrong[6:, 6:] = 1.0
    good, bad = (
        deletion_insertion(score, pixels, right, baseline, 16),
        deletion_insertion(score, pixels, wrong, baseline, 16),
    )
    # by hand for the right map: the block is gone after the first of 16 steps (4 of 64 pixels)
    assert good["deletion_auc"] == pytest.approx(0.5 / 16) and good["insertion_auc"] == pytest.approx(
        1 - 0.5 / 16
    )
    assert bad["deletion_auc"] > good["deletion_auc"] and bad["insertion_auc"] < good["insertion_auc"]


def test_integrated_gradients_are_complete_and_occlusion_is_the_drop_by_hand():
    from vlmkit.eval.saliency import integrated_gradients_pixels, occlusion_pixels

    torch.manual_seed(0)
    clip = create_model("clip-tiny", **{"vision.image_size": 32, "vision.layers": 1}).eval()
    pixels, text = torch.randn(2, 3, 32, 32), torch.randn(2, clip.cfg.embed_dim)
    t = torch.nn.functional.normalize(text, dim=-1)

    def score(x):
        with torch.no_grad():
            return (torch.nn.functional.normalize(clip.encode_image(x), dim=-1) * t).sum(-1)

    a, delta = integrated_gradients_pixels(clip, pixels, text, steps=64)
    gap = score(pixels) - score(torch.zeros_like(pixels))
    # completeness (the attributions sum to f(x) - f(baseline)), checked against our own forward passes
    assert torch.allclose(a.flatten(1).sum(1), gap, atol=0.05 * gap.abs().max().item() + 1e-4)
    occ = occlusion_pixels(clip, pixels, text)
    x = pixels.clone()
    x[:, :, 8:16, 16:24] = 0.0  # the patch at row 1, column 2
    assert torch.allclose(occ[:, 0, 10, 20], score(pixels) - score(x), atol=1e-5)
    m = explain_dual_encoder(clip, pixels, text, "occlusion")
    assert m.shape == (2, 4, 4) and torch.allclose(
        m[:, 1, 2], (score(pixels) - score(x)).clamp(min=0), atol=1e-5
    )


def test_captum_methods_without_captum_say_how_to_install_it(monkeypatch):
    import sys

    from vlmkit.data.transforms import PreprocessConfig
    from vlmkit.errors import ConfigError
    from vlmkit.eval import saliency_eval

    monkeypatch.setitem(sys.modules, "captum", None)  # import captum now fails as if it were not installed
    monkeypatch.setitem(sys.modules, "captum.attr", None)
    clip = create_model("clip-tiny", **{"vision.image_size": 32, "vision.layers": 1}).eval()
    with pytest.raises(ConfigError, match=r"captum, which is not installed: pip install 'vlmkit\[explain\]'"):
        explain_dual_encoder(
            clip, torch.randn(1, 3, 32, 32), torch.randn(1, clip.cfg.embed_dim), "integrated-gradients"
        )
    monkeypatch.setattr(saliency_eval, "captum_available", lambda: False)
    chosen, skipped = saliency_eval.DualEncoderMaps(clip, None, PreprocessConfig(image_size=32)).methods(None)
    assert chosen == ["similarity", "rollout", "relevance", "gradcam"]
    assert set(skipped) == {"integrated-gradients", "occlusion"} and "pip install" in skipped["occlusion"]

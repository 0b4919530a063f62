"""CoCa: shapes, the unimodal text path, image conditioning, generation, the loss, training, save/load, zero-shot."""

import dataclasses
import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from vlmkit.config import from_dict, to_dict
from vlmkit.data.tokenizer import Tokenizer
from vlmkit.errors import ConfigError
from vlmkit.eval.features import extract_text_features
from vlmkit.eval.zeroshot import build_zeroshot_classifier, zeroshot_logits
from vlmkit.losses import IGNORE_INDEX, CoCaLoss
from vlmkit.losses.contrastive import ClipLoss
from vlmkit.models.coca import CoCa, CoCaConfig, CoCaOutput
from vlmkit.models.decoder import Decoder, DecoderConfig
from vlmkit.models.generation import GenerationConfig
from vlmkit.models.vit import VisionConfig

PAD, BOS, EOS = 0, 1, 2
VOCAB = 64


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and on a busy machine its spin-waits cost ~20x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(**overrides) -> CoCaConfig:
    vision = dict(image_size=16, patch_size=8, width=32, layers=1, heads=2)
    vision.update(overrides.pop("vision", {}))
    decoder = dict(vocab_size=VOCAB, width=32, layers=2, heads=2, mlp_hidden=64, cross_attention_start=1)
    decoder.update(overrides.pop("decoder", {}))
    return CoCaConfig(
        embed_dim=24, vision=VisionConfig(**vision), decoder=DecoderConfig(**decoder), **overrides
    )


def tiny_model(seed: int = 0, **overrides) -> CoCa:
    torch.manual_seed(seed)
    return CoCa(tiny_config(**overrides)).eval()


def captions(lengths: list[int], T: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded `[bos] words [eos] pad...` rows with `lengths` words each: ids and mask (B, T)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), T), PAD)
    for row, n in enumerate(lengths):
        ids[row, 0] = BOS
        ids[row, 1 : n + 1] = torch.randint(3, VOCAB, (n,), generator=g)
        ids[row, n + 1] = EOS
    return ids, (ids != PAD).long()


def images(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def caption_labels(ids: torch.Tensor) -> torch.Tensor:
    return ids.masked_fill(ids == PAD, IGNORE_INDEX)  # every real token after bos is supervised


# ---------------------------------------------------------------------------- config and shapes


def test_config_validation():
    with pytest.raises(ConfigError, match="cross_attention_start"):
        tiny_config(decoder={"cross_attention_start": None})
    with pytest.raises(ConfigError, match="cross_attention_start"):
        tiny_config(decoder={"cross_attention_start": 2})  # no multimodal layer left
    with pytest.raises(ConfigError, match="image_queries"):
        tiny_config(image_queries=-1)
    cfg = tiny_config(image_queries=3)
    assert from_dict(CoCaConfig, to_dict(cfg)) == cfg  # the saved JSON rebuilds the same config


@pytest.mark.parametrize(
    "overrides, memory_shape",
    [
        ({}, (3, 5, 32)),  # class token + 2x2 patches, at the decoder width
        ({"vision": {"width": 48, "heads": 3, "pool": "mean"}}, (3, 5, 32)),  # mapped to encoder_width
        ({"vision": {"pool": "attn", "class_token": False}, "image_queries": 6}, (3, 6, 32)),  # pooler
        ({"image_queries": 2, "decoder": {"encoder_width": 16}}, (3, 2, 16)),
    ],
)
def test_shapes_and_image_embedding(overrides, memory_shape):
    model = tiny_model(**overrides)
    ids, mask = captions([3, 5, 1])
    x = images(3)
    with torch.no_grad():
        out = model(x, ids, mask)
        memory = model.image_tokens(x)
        image_embedding = model.encode_image(x, normalize=True)
    assert isinstance(out, CoCaOutput) and out.logit_bias is None
    assert out.image_features.shape == out.text_features.shape == (3, 24)
    torch.testing.assert_close(out.image_features.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(out.text_features.norm(dim=-1), torch.ones(3))
    assert out.hidden.shape == (3, 10, 32)
    assert out.logit_scale.item() == pytest.approx(1 / 0.07, rel=1e-6)
    assert memory.shape == memory_shape
    # forward pools the ViT's tokens itself (one ViT pass for both uses): the same as the ViT's own pooling
    torch.testing.assert_close(out.image_features, image_embedding, atol=1e-5, rtol=1e-5)


def test_logit_scale_is_clamped():
    model = tiny_model()
    ids, mask = captions([2])
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1000.0))
        assert model(images(1), ids, mask).logit_scale.item() == pytest.approx(100.0, rel=1e-6)


# ---------------------------------------------------------------------------- text path


def unimodal_reference(model: CoCa, ids: torch.Tensor) -> torch.Tensor:
    """Text embeddings from a separate plain Decoder holding only the unimodal layers, whose final norm
    carries `text_norm`'s weight: its `hidden` is then exactly the normed unimodal output."""
    cfg = dataclasses.replace(model.cfg.decoder, layers=1, cross_attention_start=None)
    plain = Decoder(cfg)
    state = {k: v for k, v in model.decoder.state_dict().items() if not k.startswith(("layers.1.", "norm."))}
    state["norm.weight"] = model.text_norm.weight
    plain.load_state_dict(state)
    hidden = plain(ids, logits="none").hidden  # (B, T, C)
    ends = [row.tolist().index(EOS) for row in ids]
    return model.text_proj(hidden[torch.arange(len(ids)), ends])  # (B, D)


def test_encode_text_is_the_unimodal_output_at_the_first_end_token():
    model = tiny_model()
    ids, mask = captions([2, 6, 4])
    ids[1, 3] = EOS  # a second end token later in the row: the first one is read
    with torch.no_grad():
        expected = unimodal_reference(model, ids)
        torch.testing.assert_close(model.encode_text(ids), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.encode_text(ids, mask), expected, atol=1e-5, rtol=1e-5)
        # forward's text features are the same embedding, normalised, and do not depend on the image
        for seed in (0, 1):
            out = model(images(3, seed), ids, mask)
            torch.testing.assert_close(out.text_features, F.normalize(expected, dim=-1), atol=1e-5, rtol=1e-5)


def test_encode_text_is_causal_and_ignores_padding():
    model = tiny_model()
    ids, _ = captions([2, 7])  # row 0 ends at 3; row 1 keeps the batch 9 tokens long
    with torch.no_grad():
        base = model.encode_text(ids)
        after = ids.clone()
        after[0, 4:9] = torch.tensor([5, 6, 7, 8, EOS])  # tokens after row 0's end token, in place of padding
        changed = model.encode_text(after)
        torch.testing.assert_close(changed[0], base[0], atol=1e-6, rtol=0)
        # a longer padded tensor (more padding columns) gives the same embeddings
        padded = torch.cat([ids, torch.full((2, 6), PAD)], dim=1)
        torch.testing.assert_close(model.encode_text(padded), base, atol=1e-6, rtol=0)
        before = ids.clone()
        before[0, 1] = 9 if ids[0, 1] != 9 else 10  # a token before the end token does change it
        assert not torch.allclose(model.encode_text(before)[0], base[0], atol=1e-4)


def test_caption_logits_depend_on_the_image():
    model = tiny_model()
    ids, mask = captions([4, 4])
    with torch.no_grad():
        a = model(images(2, seed=0), ids, mask)
        b = model(images(2, seed=1), ids, mask)
        logits_a, logits_b = model.decoder.lm_head(a.hidden), model.decoder.lm_head(b.hidden)
    assert (logits_a - logits_b).abs().amax() > 1e-3
    torch.testing.assert_close(
        a.text_features, b.text_features, atol=0, rtol=0
    )  # the text side is image-blind
    # with the image memory zeroed out of the cross-attention, the images would not matter: the
    # difference comes through the cross-attention layers
    model.decoder.layers[1].cross_attn.v_proj.weight.data.zero_()
    with torch.no_grad():
        a, b = model(images(2, seed=0), ids, mask), model(images(2, seed=1), ids, mask)
    torch.testing.assert_close(a.hidden, b.hidden, atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------- generation


def greedy_reference(model: CoCa, pixels: torch.Tensor, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding by hand: the full decoder on the whole sequence every step, no cache."""
    memory = model.image_tokens(pixels)
    ids = prompt
    for _ in range(steps):
        logits = model.decoder(ids, encoder_states=memory).logits[:, -1]  # (B, V)
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids[:, prompt.shape[1] :]


@pytest.mark.parametrize("image_queries", [0, 3])
def test_generate_with_and_without_cache_and_by_hand(image_queries):
    model = tiny_model(image_queries=image_queries)
    pixels = images(3)
    calls = []
    model.visual.transformer.register_forward_hook(lambda *_: calls.append(1))
    config = GenerationConfig(max_new_tokens=8, eos_token_id=[])  # no end token: every row runs 8 steps
    cached = model.generate(pixels, config=config)
    assert len(calls) == 1  # the image is encoded once for all steps
    uncached = model.generate(pixels, config=dataclasses.replace(config, use_cache=False))
    with torch.no_grad():
        expected = greedy_reference(model, pixels, torch.full((3, 1), BOS), 8)
    assert cached.shape == (3, 8)
    torch.testing.assert_close(cached, uncached, atol=0, rtol=0)
    torch.testing.assert_close(cached, expected, atol=0, rtol=0)


def test_generate_left_padded_prompts_match_rows_alone():
    model = tiny_model()
    pixels = images(2)
    prompts = [[BOS, 5, 9, 11], [BOS, 7]]
    ids = torch.tensor([prompts[0], [PAD, PAD] + prompts[1]])
    mask = (torch.arange(4) >= torch.tensor([[0], [2]])).long()  # left padding
    config = GenerationConfig(max_new_tokens=6, eos_token_id=[])
    batch = model.generate(pixels, ids, mask, config=config)
    torch.testing.assert_close(
        batch, model.generate(pixels, ids, mask, config=dataclasses.replace(config, use_cache=False))
    )
    for row, prompt in enumerate(prompts):
        alone = model.generate(pixels[row : row + 1], torch.tensor([prompt]), config=config)
        torch.testing.assert_close(batch[row : row + 1], alone, atol=0, rtol=0)


def test_generate_uses_the_decoders_end_and_pad_tokens_by_default():
    model = tiny_model()
    with torch.no_grad():  # logits: 0 everywhere, + 1 for token 5 always and + 2 for the end token after it
        model.decoder.lm_head.weight.zero_()
        model.decoder.lm_head.bias = torch.nn.Parameter(F.one_hot(torch.tensor(5), VOCAB).float())
    prompts = torch.tensor([[BOS], [BOS]])
    out = model.generate(images(2), prompts, config=GenerationConfig(max_new_tokens=4))
    assert out.tolist() == [[5, 5, 5, 5]] * 2  # no end token produced: every row runs to max_new_tokens
    out = model.generate(images(2), prompts, config=GenerationConfig(max_new_tokens=4, eos_token_id=5))
    assert out.tolist() == [[5]] * 2  # an explicit end token is kept
    with torch.no_grad():
        model.decoder.lm_head.bias[EOS] = 2.0
    out = model.generate(images(2), torch.tensor([[BOS, 7], [PAD, BOS]]), torch.tensor([[1, 1], [0, 1]]))
    assert out.tolist() == [[EOS]] * 2  # the default config ends at the decoder's end token


def test_generate_fills_end_and_pad_tokens_from_the_decoder(monkeypatch):
    import vlmkit.models.coca as coca

    seen = []
    monkeypatch.setattr(coca, "generate", lambda *args, config, **kw: seen.append(config))
    model = tiny_model(decoder={"eos_token_id": 7, "pad_token_id": 3})
    model.generate(images(1))
    model.generate(images(1), config=GenerationConfig(eos_token_id=9, pad_token_id=4, max_new_tokens=2))
    assert (seen[0].eos_token_id, seen[0].pad_token_id) == (7, 3)
    assert (seen[1].eos_token_id, seen[1].pad_token_id, seen[1].max_new_tokens) == (9, 4, 2)


# ---------------------------------------------------------------------------- loss


def reference_loss(out, labels, lm_weight, is_caption, caption_weight, contrastive_weight) -> dict:
    """Float64 by hand: CLIP InfoNCE over the caption rows and shifted next-token cross-entropy."""
    img = F.normalize(out.image_features.double(), dim=-1)[is_caption]
    txt = F.normalize(out.text_features.double(), dim=-1)[is_caption]
    logits = out.logit_scale.double() * img @ txt.T  # (n, n)
    n = len(logits)
    diag = logits[range(n), range(n)]
    i2t = (logits.logsumexp(dim=1) - diag).mean()
    t2i = (logits.logsumexp(dim=0) - diag).mean()
    contrastive = (i2t + t2i) / 2
    h, y = out.hidden.double()[:, :-1], labels[:, 1:]  # position t predicts token t+1
    token_logits = h @ lm_weight.double().T  # (B, T-1, V)
    nll = token_logits.logsumexp(-1) - token_logits.gather(-1, y.clamp(min=0)[..., None])[..., 0]
    keep = y != IGNORE_INDEX
    caption = nll[keep].sum() / keep.sum()
    return {
        "loss": contrastive_weight * contrastive + caption_weight * caption,
        "contrastive_loss": contrastive,
        "caption_loss": caption,
    }


def test_coca_loss_equals_float64_reference_with_caption_mask():
    model = tiny_model()
    ids, mask = captions([3, 5, 2, 6, 4])
    labels = caption_labels(ids)
    labels[1, :4] = IGNORE_INDEX  # a QA-style row: only the answer is supervised
    is_caption = torch.tensor([True, False, True, True, False])
    loss_fn = CoCaLoss(caption_weight=2.0, contrastive_weight=0.5)
    with torch.no_grad():
        out = model(images(5), ids, mask)
        out.logit_scale = torch.tensor(3.7)  # a scale of 14 would hide errors in the contrastive part
        lm = model.decoder.lm_head
        for flags in (is_caption, None):
            got = loss_fn(out, labels, lm, is_caption=flags)
            want = reference_loss(
                out, labels, lm.weight, flags if flags is not None else slice(None), 2.0, 0.5
            )
            for key in want:
                torch.testing.assert_close(got[key].double(), want[key], atol=1e-5, rtol=1e-5)
        # the distributed path (every rank scores the global caption rows) gives the same in one process
        torch.testing.assert_close(
            ClipLoss()
            .global_loss(out.image_features, out.text_features, out.logit_scale, is_caption)
            .double(),
            reference_loss(out, labels, lm.weight, is_caption, 2.0, 0.5)["contrastive_loss"],
            atol=1e-5,
            rtol=1e-5,
        )


def _two_rank_features() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    image, text = F.normalize(torch.randn(2, 8, 6, generator=g), dim=-1)  # (8, 6) each
    return image, text, torch.tensor([1, 0, 1, 1, 0, 0, 1, 0]).bool()  # 3 captions on rank 0, 1 on rank 1


def _contrastive_rank(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        image, text, flags = _two_rank_features()
        rows = slice(4 * rank, 4 * rank + 4)
        image, text = image[rows].clone().requires_grad_(), text[rows].clone().requires_grad_()
        loss = CoCaLoss().contrastive_loss(image, text, torch.tensor(5.0), None, flags[rows])
        loss.backward()
        torch.save({"loss": loss.detach(), "image": image.grad, "text": text.grad}, f"{out_dir}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_caption_mask_across_two_ranks_matches_one_process(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_contrastive_rank, args=(port, str(tmp_path)), nprocs=2, start_method="spawn")
    ranks = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(2)]
    image, text, flags = _two_rank_features()
    image.requires_grad_(), text.requires_grad_()
    expected = CoCaLoss().contrastive_loss(image, text, torch.tensor(5.0), None, flags)  # ClipLoss on 4 rows
    expected.backward()
    for r in ranks:  # every rank's value is the global loss
        torch.testing.assert_close(r["loss"], expected.detach())
    # DDP averages over 2 ranks: the mean of what each rank's features receive is the one-process gradient
    for key, grad in (("image", image.grad), ("text", text.grad)):
        torch.testing.assert_close(torch.cat([r[key] for r in ranks]) / 2, grad, atol=1e-6, rtol=1e-5)


def test_coca_loss_without_caption_rows_is_captioning_only():
    model = tiny_model()
    ids, mask = captions([3, 4])
    out = model(images(2), ids, mask)
    got = CoCaLoss()(out, caption_labels(ids), model.decoder.lm_head, is_caption=torch.tensor([False, False]))
    assert got["contrastive_loss"].item() == 0.0
    torch.testing.assert_close(got["loss"], 2.0 * got["caption_loss"])
    got["loss"].backward()  # still a graph through both towers
    assert model.visual.positional_embedding.grad is not None
    with pytest.raises(ValueError, match="is_caption"):
        CoCaLoss()(out, caption_labels(ids), model.decoder.lm_head, is_caption=torch.tensor([True]))


def test_training_steps_reduce_both_losses():
    model = tiny_model().train()
    ids, mask = captions([3, 5, 2, 4], seed=1)
    labels, pixels = caption_labels(ids), images(4, seed=2)
    loss_fn = CoCaLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    history = []
    for _ in range(12):
        losses = loss_fn(model(pixels, ids, mask), labels, model.decoder.lm_head)
        history.append({k: v.item() for k, v in losses.items()})
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
    first, last = history[0], history[-1]
    assert last["caption_loss"] < 0.8 * first["caption_loss"], history
    assert last["contrastive_loss"] < 0.8 * first["contrastive_loss"], history


# ---------------------------------------------------------------------------- save / load, evaluation


def test_state_dict_round_trip(tmp_path):
    model = tiny_model(image_queries=2)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    cfg = from_dict(CoCaConfig, to_dict(model.cfg))
    torch.manual_seed(1)  # a different initialisation, overwritten by the load
    loaded = CoCa(cfg).eval()
    loaded.load_state_dict(load_file(str(tmp_path / "model.safetensors")))
    ids, mask = captions([3, 2])
    with torch.no_grad():
        a, b = model(images(2), ids, mask), loaded(images(2), ids, mask)
    for field in ("image_features", "text_features", "hidden"):
        torch.testing.assert_close(getattr(a, field), getattr(b, field), atol=0, rtol=0)


def test_works_with_zeroshot_classifier_and_text_features():
    texts = ["a red circle", "a blue square", "a green triangle", "a red square", "a blue circle"] * 4
    tokenizer = Tokenizer.train(texts, vocab_size=300, context_length=12)
    assert (tokenizer.sot_token_id, tokenizer.eot_token_id, tokenizer.pad_token_id) == (BOS, EOS, PAD)
    model = tiny_model(decoder={"vocab_size": tokenizer.vocab_size})
    classnames, templates = ["circle", "square", "triangle"], ["a {}.", "a photo of a {}."]
    classifier = build_zeroshot_classifier(model, tokenizer, classnames, templates)  # (D, C)
    assert classifier.shape == (24, 3)
    with torch.no_grad():
        for c, name in enumerate(classnames):
            prompts = tokenizer([t.replace("{}", name) for t in templates])
            mean = F.normalize(model.encode_text(prompts), dim=-1).mean(dim=0)
            torch.testing.assert_close(classifier[:, c], F.normalize(mean, dim=0), atol=1e-5, rtol=1e-5)
        features = extract_text_features(model, tokenizer, texts[:5], batch_size=2)
        torch.testing.assert_close(features, model.encode_text(tokenizer(texts[:5]), normalize=True))
        logits = zeroshot_logits(model.encode_image(images(4)), classifier)
    assert logits.shape == (4, 3) and torch.isfinite(logits).all()


# ---------------------------------------------------------------------------- an independent reference


def reference_coca(state: dict, cfg: CoCaConfig, pixels, ids, mask, labels):
    """CoCa written out from its weights with plain float64 tensor ops, none of vlmkit's modules: the
    embeddings, the caption decoder's hidden states, and both losses (CLIP's InfoNCE, next-token CE)."""
    w = {k: v.double() for k, v in state.items()}
    v, d = cfg.vision, cfg.decoder

    def attend(q, k, v_, allowed=None):  # (B, nh, T, hs), (B, nh, S, hs); allowed (B, 1, T, S) bool
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        return scores.softmax(-1) @ v_

    def heads(x, n):  # (B, T, n*hs) -> (B, n, T, hs)
        return x.view(x.shape[0], x.shape[1], n, -1).transpose(1, 2)

    def merge(x):  # (B, n, T, hs) -> (B, T, n*hs)
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)

    # the image tower: conv patches, class token, positions, pre-norm blocks, final norm
    p = "visual."
    x = (
        F.conv2d(pixels.double(), w[p + "patch_embed.proj.weight"], stride=v.patch_size)
        .flatten(2)
        .transpose(1, 2)
    )
    x = torch.cat([w[p + "class_embedding"].expand(len(x), 1, -1), x], dim=1) + w[p + "positional_embedding"]
    ln = lambda t, name: F.layer_norm(t, t.shape[-1:], w[name + ".weight"], w[name + ".bias"], v.norm_eps)  # noqa: E731
    x = ln(x, p + "ln_pre")
    for i in range(v.layers):
        b = f"{p}transformer.blocks.{i}."
        q, k, v_ = (ln(x, b + "ln_1") @ w[b + "attn.qkv.weight"].T + w[b + "attn.qkv.bias"]).chunk(3, dim=-1)
        y = merge(attend(heads(q, v.heads), heads(k, v.heads), heads(v_, v.heads)))
        x = x + y @ w[b + "attn.proj.weight"].T + w[b + "attn.proj.bias"]
        h = F.gelu(ln(x, b + "ln_2") @ w[b + "mlp.fc1.weight"].T + w[b + "mlp.fc1.bias"])
        x = x + h @ w[b + "mlp.fc2.weight"].T + w[b + "mlp.fc2.bias"]
    tokens = ln(x, p + "ln_post")  # (B, 1 + N, Cv): the decoder's memory
    image = tokens[:, 0] @ w[p + "proj.weight"].T  # (B, D)

    # the decoder: Llama blocks (RMSNorm, rotary positions counted over real tokens, causal + padding mask,
    # SwiGLU), the layers from cross_attention_start on also cross-attending to the image tokens
    rms = lambda t, name: t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + d.norm_eps) * w[name]  # noqa: E731
    B, T = ids.shape
    hs = d.width // d.heads
    pos = (mask.cumsum(-1) - 1).clamp(min=0).double()  # (B, T)
    freqs = pos[..., None] / d.rope_theta ** (
        torch.arange(0, hs, 2, dtype=torch.float64) / hs
    )  # (B, T, hs/2)
    cos, sin = torch.cat([freqs, freqs], -1).cos()[:, None], torch.cat([freqs, freqs], -1).sin()[:, None]

    def rotate(t):
        t1, t2 = t.chunk(2, dim=-1)
        return t * cos + torch.cat([-t2, t1], dim=-1) * sin

    allowed = torch.ones(T, T, dtype=torch.bool).tril()[None, None] & mask.bool()[:, None, None, :]
    allowed = allowed | torch.eye(T, dtype=torch.bool)  # a padded query still sees itself
    x = w["decoder.embed_tokens.weight"][ids]
    unimodal = None
    for i in range(d.layers):
        b = f"decoder.layers.{i}."
        if i == d.cross_attention_start:
            unimodal = x
        h = rms(x, b + "input_layernorm.weight")
        q, k, v_ = (h @ w[b + f"self_attn.{n}_proj.weight"].T for n in "qkv")
        y = attend(rotate(heads(q, d.heads)), rotate(heads(k, d.heads)), heads(v_, d.heads), allowed)
        x = x + merge(y) @ w[b + "self_attn.o_proj.weight"].T
        if i >= d.cross_attention_start:
            h = rms(x, b + "cross_attn_norm.weight")
            q = h @ w[b + "cross_attn.q_proj.weight"].T
            k, v_ = (tokens @ w[b + f"cross_attn.{n}_proj.weight"].T for n in "kv")
            y = attend(heads(q, d.heads), heads(k, d.heads), heads(v_, d.heads))
            x = x + merge(y) @ w[b + "cross_attn.o_proj.weight"].T
        h = rms(x, b + "post_attention_layernorm.weight")
        gate, up = h @ w[b + "mlp.gate_proj.weight"].T, h @ w[b + "mlp.up_proj.weight"].T
        x = x + (F.silu(gate) * up) @ w[b + "mlp.down_proj.weight"].T
    hidden = rms(x, "decoder.norm.weight")  # (B, T, C)
    first_eos = [row.tolist().index(d.eos_token_id) for row in ids]
    text = rms(unimodal[torch.arange(B), first_eos], "text_norm.weight") @ w["text_proj.weight"].T  # (B, D)

    image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    logits = w["logit_scale"].clamp(max=cfg.max_logit_scale).exp() * image @ text.T  # (B, B)
    targets = torch.arange(B)
    contrastive = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
    token_logits = hidden @ w["decoder.lm_head.weight"].T  # (B, T, V)
    caption = F.cross_entropy(token_logits[:, :-1].reshape(-1, d.vocab_size), labels[:, 1:].reshape(-1))
    total = cfg.contrastive_loss_weight * contrastive + cfg.caption_loss_weight * caption
    return dict(image=image, text=text, hidden=hidden, contrastive=contrastive, caption=caption, loss=total)


def test_coca_matches_an_independent_float64_reference():
    model = tiny_model(seed=3).double()
    ids, mask = captions([2, 6, 4, 3])
    pixels = images(4, seed=2).double()
    labels = caption_labels(ids)
    out = model(pixels, ids, mask)
    ours = CoCaLoss(caption_weight=model.cfg.caption_loss_weight)(out, labels, model.decoder.lm_head)
    ref = reference_coca(model.state_dict(), model.cfg, pixels, ids, mask, labels)
    torch.testing.assert_close(out.image_features, ref["image"])
    torch.testing.assert_close(out.text_features, ref["text"])
    real = mask.bool()
    torch.testing.assert_close(out.hidden[real], ref["hidden"][real])  # padded positions carry no loss
    torch.testing.assert_close(ours["contrastive_loss"].double(), ref["contrastive"])
    torch.testing.assert_close(ours["caption_loss"].double(), ref["caption"])
    torch.testing.assert_close(ours["loss"].double(), ref["loss"])
    # and the gradient of the whole loss, through both towers, the decoder and the logit scale
    ours["loss"].backward()
    params = dict(model.named_parameters())
    state = {k: p.detach().clone().requires_grad_(True) for k, p in params.items()}
    reference_coca(state, model.cfg, pixels, ids, mask, labels)["loss"].backward()
    for k, p in params.items():
        torch.testing.assert_close(p.grad, state[k].grad, msg=k)

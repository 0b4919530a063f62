"""The DALL-E style model: the training rows and loss by hand, KV-cache sampling equal to recomputation,
batched (left-padded) captions equal to one by one, classifier-free guidance as its formula, top-1 = greedy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlmkit.errors import ConfigError
from vlmkit.models.dalle import Dalle, DalleConfig
from vlmkit.models.decoder import DecoderConfig
from vlmkit.models.vqvae import VQVAEConfig


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = DalleConfig(
        vqvae=VQVAEConfig(image_size=32, channels=(8, 16, 32), codebook_size=16, code_dim=8),  # 4x4 codes
        decoder=DecoderConfig(width=64, layers=2, heads=2, max_seq_len=64),
        text_vocab_size=50, max_text_len=8,
    )  # fmt: skip
    return Dalle(cfg).eval()


CAPTIONS = [[1, 7, 8, 9], [1, 12], [1, 20, 21, 22, 23, 24]]


def test_rows_and_loss_by_hand(model):
    codes = torch.randint(0, 16, (2, 4, 4))
    ids, mask, labels = model.sequences(CAPTIONS[:2], codes)
    boi, V = model.cfg.boi_token_id, model.cfg.text_vocab_size
    assert boi == 66 and model.cfg.decoder.vocab_size == 67
    assert (
        ids[0, :5].tolist() == [1, 7, 8, 9, boi]
        and ids[0, 5:21].tolist() == (codes[0].flatten() + V).tolist()
    )
    assert ids[1, :3].tolist() == [1, 12, boi] and mask[1].tolist() == [1] * 19 + [0] * 2
    assert (labels != -100).sum() == 32
    logits = model.language_model(ids, attention_mask=mask).logits  # (B, T, V + K + 1)
    expected = []
    for b, start in ((0, 5), (1, 3)):  # the codes follow <boi> at position start - 1 ... start + 15
        for t in range(start, start + 16):
            row = logits[b, t - 1, V : V + 16]
            expected.append(F.cross_entropy(row[None], (ids[b, t] - V)[None]))
    torch.testing.assert_close(model.loss(CAPTIONS[:2], codes), torch.stack(expected).mean())


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_cached_sampling_equals_recomputation(model, guidance):
    for temperature, top_k in ((0.0, None), (1.0, 5)):
        a = model.sample(CAPTIONS, temperature=temperature, top_k=top_k, guidance=guidance,
                         generator=torch.Generator().manual_seed(0))  # fmt: skip
        b = model.sample(CAPTIONS, temperature=temperature, top_k=top_k, guidance=guidance,
                         generator=torch.Generator().manual_seed(0), use_cache=False)  # fmt: skip
        assert a.shape == (3, 4, 4) and torch.equal(a, b)


def test_a_batch_of_captions_samples_as_each_alone(model):
    together = model.sample(CAPTIONS, temperature=0.0, guidance=2.0)
    for i, caption in enumerate(CAPTIONS):
        assert torch.equal(together[i], model.sample([caption], temperature=0.0, guidance=2.0)[0])
    assert torch.equal(
        together, model.sample(CAPTIONS, temperature=1.0, top_k=1, guidance=2.0)
    )  # top-1 = greedy


def test_guidance_mixes_the_captionless_prediction(model):
    V, boi = model.cfg.text_vocab_size, model.cfg.boi_token_id
    lm = model.language_model
    cond = lm(torch.tensor([CAPTIONS[0] + [boi]])).logits[0, -1, V : V + 16]
    uncond = lm(torch.tensor([[1, boi]])).logits[0, -1, V : V + 16]
    first = model.sample([CAPTIONS[0]], temperature=0.0, guidance=4.0)[0, 0, 0]
    assert first == (uncond + 4.0 * (cond - uncond)).argmax()


def test_a_context_too_short_is_one_line():
    with pytest.raises(ConfigError, match="shorter than a caption"):
        DalleConfig(vqvae=VQVAEConfig(image_size=64), decoder=DecoderConfig(max_seq_len=64), max_text_len=32)

"""DALL-E style text-to-image: a decoder language model over [caption tokens][image tokens].

    caption ids --+-- [bos] caption <boi> c_1 ... c_N   (c_k: the VQ-VAE's codes of the image, row by row)
                  decoder (vlmkit.models.decoder, causal, RoPE, KV cache) predicts each code from all before it

One vocabulary: the text tokenizer's ids [0, V), the codes at [V, V + K) and `<boi>` (begin of image) at V + K.
Training is the next-token loss on the image's codes (and `<boi>`) only; a tenth of the captions are dropped
(`[bos] <boi>` alone) so that the same model also samples without a caption, which classifier-free guidance
needs: logits = uncond + s * (cond - uncond) (Crowson's / Gafni et al.'s use in autoregressive models).
`sample` draws the N codes with temperature and top-k, with the KV cache (or recomputing the whole sequence at
each step, which the tests check it equals); the frozen VQ-VAE (vlmkit.models.vqvae) turns codes into pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlmkit.errors import ConfigError
from vlmkit.models.decoder import Decoder, DecoderConfig
from vlmkit.models.vqvae import VQVAE, VQVAEConfig


@dataclass
class DalleConfig:
    vqvae: VQVAEConfig = field(default_factory=VQVAEConfig)
    decoder: DecoderConfig = field(default_factory=lambda: DecoderConfig(width=256, layers=4, heads=4))
    text_vocab_size: int = 1000  # the tokenizer's; the decoder's vocabulary is text + codes + <boi>
    max_text_len: int = 32
    cond_drop: float = 0.1  # captions dropped in training, for classifier-free guidance

    def __post_init__(self):
        if isinstance(self.vqvae, dict):
            self.vqvae = VQVAEConfig(**self.vqvae)
        if isinstance(self.decoder, dict):
            self.decoder = DecoderConfig(**self.decoder)
        vocab = self.text_vocab_size + self.vqvae.codebook_size + 1
        if self.decoder.vocab_size != vocab:
            self.decoder.vocab_size = vocab
        needed = self.max_text_len + 2 + self.vqvae.num_tokens
        if self.decoder.max_seq_len < needed:
            raise ConfigError(
                f"decoder.max_seq_len {self.decoder.max_seq_len} is shorter than a caption of max_text_len "
                f"{self.max_text_len} + <bos> + <boi> + {self.vqvae.num_tokens} image tokens = {needed}"
            )

    @property
    def image_size(self) -> int:
        return self.vqvae.image_size

    @property
    def boi_token_id(self) -> int:
        return self.text_vocab_size + self.vqvae.codebook_size


class Dalle(nn.Module):
    def __init__(self, cfg: DalleConfig):
        super().__init__()
        self.cfg = cfg
        self.vqvae = VQVAE(cfg.vqvae)
        self.language_model = Decoder(cfg.decoder)

    @property
    def num_image_tokens(self) -> int:
        return self.cfg.vqvae.num_tokens

    def sequences(self, text_ids: list[list[int]], codes: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """Right-padded training rows [text ids] <boi> [codes + V] -> (input_ids, attention_mask, labels), the
        labels on <boi>'s successors only (the codes). `text_ids` start with <bos> when the tokenizer has one;
        codes (B, h, w)."""
        cfg, d = self.cfg, self.cfg.decoder
        n = self.num_image_tokens
        T = max(len(t) for t in text_ids) + 1 + n
        ids = torch.full((len(text_ids), T), d.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        flat = codes.flatten(1) + cfg.text_vocab_size if codes is not None else None
        for b, t in enumerate(text_ids):
            k = len(t)
            ids[b, :k] = torch.tensor(t, dtype=torch.long)
            ids[b, k] = cfg.boi_token_id
            if flat is not None:
                ids[b, k + 1 : k + 1 + n] = flat[b]
                labels[b, k + 1 : k + 1 + n] = flat[b]
            mask[b, : k + 1 + n] = 1
        return ids, mask, labels

    def loss(self, text_ids: list[list[int]], codes: Tensor) -> Tensor:
        """Mean next-token loss over the image codes of each row."""
        ids, mask, labels = self.sequences(text_ids, codes.to("cpu"))
        device = self.language_model.embed_tokens.weight.device
        out = self.language_model(ids.to(device), attention_mask=mask.to(device), logits="none")
        logits = self.image_logits(out.hidden[:, :-1])
        target = labels[:, 1:].to(device)
        keep = target != -100
        return F.cross_entropy(logits[keep], target[keep] - self.cfg.text_vocab_size)

    def image_logits(self, hidden: Tensor) -> Tensor:
        """Hidden states (..., C) -> logits over the K codes only (..., K)."""
        V, K = self.cfg.text_vocab_size, self.cfg.vqvae.codebook_size
        weight = self.language_model.lm_head.weight[V : V + K]
        return F.linear(hidden, weight)

    @torch.inference_mode()
    def sample(
        self,
        text_ids: list[list[int]],
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        guidance: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        use_cache: bool = True,
    ) -> Tensor:
        """Codes (B, h, w) for each caption's ids, sampled one by one; `guidance` > 1 mixes in the captionless
        prediction (classifier-free guidance); temperature 0 is greedy. `generator`: one for the batch, or one
        per row (each image then depends on its own seed alone)."""
        cfg, d = self.cfg, self.cfg.decoder
        bos = [d.bos_token_id] if d.bos_token_id is not None else []
        rows = list(text_ids) + ([bos] * len(text_ids) if guidance != 1.0 else [])
        B, n = len(text_ids), self.num_image_tokens
        L = max(len(r) for r in rows) + 1
        device = self.language_model.embed_tokens.weight.device
        ids = torch.full((len(rows), L), d.pad_token_id, dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):  # left padding: every row's next token is at position L
            ids[i, L - len(r) - 1 : L - 1] = torch.tensor(r, dtype=torch.long)
            ids[i, L - 1] = cfg.boi_token_id
            mask[i, L - len(r) - 1 :] = 1
        lm = self.language_model
        cache = lm.new_cache(len(rows), L + n) if use_cache else None
        h = lm(ids, attention_mask=mask, cache=cache, logits="none").hidden[:, -1]
        out = []
        for step in range(n):
            logits = self.image_logits(h).float()  # (R, K)
            if guidance != 1.0:
                cond, uncond = logits[:B], logits[B:]
                logits = uncond + guidance * (cond - uncond)
            code = _pick(logits, temperature, top_k, generator)  # (B,)
            out.append(code)
            if step == n - 1:
                break
            token = (code + cfg.text_vocab_size).repeat(len(rows) // B)[:, None]  # (R, 1)
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            if use_cache:
                h = lm(token, attention_mask=mask, cache=cache, logits="none").hidden[:, -1]
            else:
                ids = torch.cat([ids, token], dim=1)
                h = lm(ids, attention_mask=mask, logits="none").hidden[:, -1]
        g = cfg.vqvae.grid
        return torch.stack(out, dim=1).view(B, g, g)

    @torch.inference_mode()
    def decode(self, codes: Tensor) -> Tensor:
        """Codes (B, h, w) -> images (B, 3, S, S) in the VQ-VAE's normalisation."""
        return self.vqvae.decode(codes)


def caption_ids(tokenizer, captions: list[str], max_text_len: int) -> list[list[int]]:
    """The text rows a Dalle reads: [bos] (when the tokenizer has one) + each caption's ids, cut to
    `max_text_len`."""
    bos = [tokenizer.sot_token_id] if tokenizer.sot_token_id is not None else []
    return [bos + tokenizer.encode(text)[:max_text_len] for text in captions]


def _pick(
    logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator | list | None
) -> Tensor:
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=-1)
    if isinstance(generator, list):  # a generator per row: sampled on the CPU, where each one lives
        rows = [torch.multinomial(p.cpu(), 1, generator=g) for p, g in zip(probs, generator, strict=True)]
        return torch.cat(rows).to(logits.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)

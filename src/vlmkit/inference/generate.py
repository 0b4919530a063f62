"""Image + text in, text out: a loaded generative model (LLaVA-style or CoCa) behind one small API.

    vlm = VLMPipeline.from_pretrained("runs/llava-tiny-shapes")
    vlm.answer(["cat.png"], ["what colour is the star?"])     # -> ["red"]
    vlm.caption(["cat.png"])                                   # -> ["a small red star on the left"]
    vlm.generate([["a.png", "b.png"]], [[{"from": "human", "value": "<image><image>\\nsame colour?"}]])

It renders prompts with the model's chat template (LLaVA), the plain template (CoCa) or Flamingo's
`<image>Question: ... Short answer:` chunks, loads and preprocesses the images, left-pads the batch and
decodes the new tokens. A conversation may hold several images (LLaVA, Flamingo: one per `<image>`, in
order); CoCa reads one. The CLI (`vlmkit caption`,
`vlmkit chat`, `vlmkit eval vqa|captioning`) and the trainer's evaluations use it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from vlmkit.data.chat import (
    IMAGE_TOKEN,
    VIDEO_TOKEN,
    coca_turns,
    expand_video,
    flamingo_turns,
    get_template,
    normalize_conversation,
    render,
)
from vlmkit.data.transforms import ImageTransform
from vlmkit.errors import ConfigError, DataError
from vlmkit.inference.embed import image_batch
from vlmkit.losses.captioning import IGNORE_INDEX
from vlmkit.models.generation import GenerationConfig, trim_stop_strings
from vlmkit.models.registry import model_family
from vlmkit.runtime import resolve_precision

CAPTION_PROMPT = "Describe the image."


class VLMPipeline:
    """A generative model with its tokenizer and preprocessing, ready to caption, answer and chat."""

    def __init__(
        self, model, tokenizer, preprocess, device: str | torch.device = "cpu", precision: str = "auto"
    ):
        self.family = model_family(model.cfg)
        if self.family == "clip":
            raise ConfigError(
                "this is a CLIP/SigLIP model: it embeds images and texts but does not generate text; "
                "use `vlmkit classify` / `vlmkit embed`, or a CoCa or LLaVA model"
            )
        if tokenizer is None:
            raise ConfigError(
                "this model folder has no tokenizer.json; generation needs the model's tokenizer"
            )
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        # "auto": bf16 autocast only where this device runs bf16 fast (vlmkit.runtime)
        self.precision = resolve_precision(precision, self.device).name
        cfg = model.cfg
        self.template = {"llava": getattr(cfg, "chat_template", None), "flamingo": "flamingo"}.get(
            self.family, "plain"
        )
        # LLaVA: each <image> becomes the image's tokens; Flamingo keeps one <image> token per image
        self.num_image_tokens = {"llava": getattr(model, "num_image_tokens", 0), "flamingo": 1}.get(
            self.family, 0
        )
        self.image_token_id = cfg.image_token_id if self.family in ("llava", "flamingo") else None
        self.transform = ImageTransform(preprocess, train=False)
        self.end_ids = get_template(self.template).end_ids(tokenizer)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu", **kwargs) -> VLMPipeline:
        """Load a vlmkit CoCa/LLaVA folder or a Hugging Face LLaVA folder."""
        from vlmkit.convert import load_pretrained

        pt = load_pretrained(path, device)
        return cls(pt.model, pt.tokenizer, pt.preprocess, device=device, **kwargs)

    # ---------------------------------------------------------------- inputs
    def pixel_values(self, images: Sequence[str | Path | Image.Image]) -> torch.Tensor:
        """Paths or PIL images -> normalised (B, 3, S, S) on the model's device."""
        return image_batch(images, self.transform).to(self.device)

    def prompt_ids(self, conversation: list[dict]) -> list[int]:
        """The conversation rendered up to the assistant's turn, as token ids."""
        ids, _ = render(
            flamingo_turns(conversation) if self.family == "flamingo" else conversation,
            self.tokenizer,
            self.template,
            num_image_tokens=self.num_image_tokens,
            image_token_id=self.image_token_id,
            add_generation_prompt=True,
        )
        return ids

    def chat_prompt_ids(self, conversation: list[dict]) -> list[int]:
        """`prompt_ids` of a chat turn as this family reads it (CoCa: without image markers, see `coca_turns`)."""
        if self.family == "coca":
            conversation = coca_turns(conversation, is_caption=False)
        return self.prompt_ids(conversation)

    def generation_config(self, **overrides) -> GenerationConfig:
        """Greedy up to 64 tokens, stopping at the template's end of turn, unless `overrides` say otherwise."""
        pad = self.tokenizer.pad_token_id
        return GenerationConfig(**{"eos_token_id": self.end_ids, "pad_token_id": pad, **overrides})

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    # ---------------------------------------------------------------- generation
    def _image_groups(self, images, conversations) -> list[list]:
        """Each conversation's images as a list, checked against its <image> markers (one line if not)."""
        if len(images) != len(conversations):
            raise ValueError(f"{len(images)} images for {len(conversations)} conversations")
        groups = [list(x) if isinstance(x, (list, tuple)) else [x] for x in images]
        for i, (group, conversation) in enumerate(zip(groups, conversations, strict=True)):
            if self.family == "coca":
                if len(group) != 1:
                    raise DataError(
                        f"conversation {i}: CoCa reads one image per conversation, not {len(group)}"
                    )
                continue
            turns = normalize_conversation(conversation, f"conversation {i}")
            markers = sum(text.count(IMAGE_TOKEN) for _, text in turns)
            if markers != len(group):
                raise DataError(
                    f"conversation {i} has {markers} {IMAGE_TOKEN} markers but {len(group)} images; "
                    f"give one image per {IMAGE_TOKEN}, in order"
                )
        return groups

    def _pixels(self, groups: list[list]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """LLaVA / CoCa: every image in order (N, 3, S, S); Flamingo: (B, M, 3, S, S) with each row's count.
        LLaVA conversations without any image (text only): None."""
        if self.family == "llava" and not any(groups):
            return None, None
        flat = self.pixel_values([im for g in groups for im in g])
        if self.family != "flamingo":
            return flat, None
        counts = torch.tensor([len(g) for g in groups])
        out = flat.new_zeros(len(groups), max(1, int(counts.max())), *flat.shape[1:])
        out[torch.arange(out.shape[1])[None] < counts[:, None]] = flat
        return out, counts.to(self.device)

    @torch.inference_mode()
    def generate(
        self,
        images: Sequence[str | Path | Image.Image | Sequence[str | Path | Image.Image]],
        conversations: Sequence[list[dict]],
        config: GenerationConfig | None = None,
        streamer=None,
    ) -> list[str]:
        """The assistant's next message for each conversation. `images[i]` is conversation i's image, or
        the list of its images, one per `<image>` marker in order (LLaVA and Flamingo models)."""
        groups = self._image_groups(images, conversations)
        config = config or self.generation_config()
        input_ids, attention_mask = self._left_padded([self.chat_prompt_ids(c) for c in conversations])
        pixels, counts = self._pixels(groups)
        with self._autocast():
            new = self.model.generate(
                input_ids=input_ids.to(self.device),
                pixel_values=pixels,
                attention_mask=attention_mask.to(self.device),
                config=config,
                tokenizer=self.tokenizer,
                streamer=streamer,
                **({"num_media": counts} if counts is not None else {}),
            )
        texts = [self.decode(row) for row in new.tolist()]
        return [trim_stop_strings(t, config.stop_strings) for t in texts] if config.stop_strings else texts

    def _left_padded(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids, attention_mask (B, T), left padded: every row's next token is at position T."""
        T = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), T), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), T), dtype=torch.long)
        for i, p in enumerate(prompts):
            input_ids[i, T - len(p) :] = torch.tensor(p)
            attention_mask[i, T - len(p) :] = 1
        return input_ids, attention_mask

    @torch.inference_mode()
    def answer_video(
        self,
        clips: Sequence[torch.Tensor],
        questions: Sequence[str],
        time_pool: str | None = None,
        **generation,
    ) -> list[str]:
        """Short answers to one question per clip (LLaVA video models). `clips[i]` is (T, 3, S, S), normalised
        (`vlmkit.data.video.frames_tensor` with `self.transform`); its frames become T images with their frame
        positions. `time_pool="mean"`: every frame replaced by the clip's mean (a control)."""
        if self.family != "llava":
            raise ConfigError(f"video questions are for LLaVA video models, not {self.family}")
        conversations = [expand_video([{"from": "human", "value": f"{VIDEO_TOKEN}\n{q}"}], len(c))
                         for c, q in zip(clips, questions, strict=True)]  # fmt: skip
        input_ids, attention_mask = self._left_padded([self.prompt_ids(c) for c in conversations])
        config = self.generation_config(**{"max_new_tokens": 16, **generation})
        with self._autocast():
            new = self.model.generate(
                input_ids=input_ids.to(self.device),
                pixel_values=torch.cat(list(clips)).to(self.device),
                attention_mask=attention_mask.to(self.device),
                config=config,
                tokenizer=self.tokenizer,
                frame_index=torch.cat([torch.arange(len(c)) for c in clips]).to(self.device),
                time_pool=time_pool,
            )
        return [self.decode(row) for row in new.tolist()]

    def decode(self, ids: list[int]) -> str:
        """New tokens -> text, up to the first end-of-turn token."""
        for end in self.end_ids:
            if end in ids:
                ids = ids[: ids.index(end)]
        return self.tokenizer.decode(ids)

    def answer(self, images, questions: Sequence[str], **generation) -> list[str]:
        """Short answers to one question per image."""
        conversations = [[{"from": "human", "value": f"{IMAGE_TOKEN}\n{q}"}] for q in questions]
        return self.generate(
            images, conversations, self.generation_config(**{"max_new_tokens": 16, **generation})
        )

    def caption(self, images, prompt: str = CAPTION_PROMPT, **generation) -> list[str]:
        """A caption per image. CoCa captions from the start token alone (its captioning format)."""
        if self.family == "coca":
            config = self.generation_config(**{"max_new_tokens": 40, **generation})
            with self._autocast(), torch.inference_mode():
                new = self.model.generate(
                    pixel_values=self.pixel_values(images), config=config, tokenizer=self.tokenizer
                )
            return [self.decode(row) for row in new.tolist()]
        if self.family == "flamingo":  # Flamingo's captioning format: <image>Output: caption<|endofchunk|>
            return self._flamingo_captions(
                images, self.generation_config(**{"max_new_tokens": 40, **generation})
            )
        conversations = [[{"from": "human", "value": f"{IMAGE_TOKEN}\n{prompt}"}]] * len(images)
        return self.generate(
            images, conversations, self.generation_config(**{"max_new_tokens": 40, **generation})
        )

    @torch.inference_mode()
    def _flamingo_captions(self, images, config: GenerationConfig) -> list[str]:
        from vlmkit.data.fewshot import CAPTION_FORMAT

        ids = self.tokenizer.encode(IMAGE_TOKEN + CAPTION_FORMAT.format("").strip())
        bos = self.tokenizer.sot_token_id
        ids = ([bos] if bos is not None else []) + ids
        input_ids = torch.tensor([ids] * len(images), device=self.device)
        with self._autocast():
            new = self.model.generate(input_ids, self.pixel_values(images)[:, None], config=config,
                                      tokenizer=self.tokenizer)  # fmt: skip
        return [self.decode(row).strip() for row in new.tolist()]

    # ---------------------------------------------------------------- scoring
    @torch.inference_mode()
    def log_likelihood(
        self,
        images: Sequence[str | Path | Image.Image],
        captions: Sequence[str],
        prompt: str = CAPTION_PROMPT,
    ) -> torch.Tensor:
        """log p(caption | image) of each (image, caption) pair, summed over the caption's tokens and its end
        of turn, as the model captions (CoCa: the caption alone; LLaVA: the answer to `prompt`). (B,) float32."""
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images for {len(captions)} captions")
        input_ids, labels, attention_mask = self.scoring_batch(captions, prompt)
        return self.answer_log_prob(self.pixel_values(images), input_ids, labels, attention_mask).cpu()

    def scoring_batch(
        self, captions: Sequence[str], prompt: str = CAPTION_PROMPT
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each caption as the answer to `prompt` about one image, rendered with the model's template and right
        padded: input_ids, labels (IGNORE_INDEX outside the answer and its end of turn), attention_mask, (B, T)
        each, on the model's device."""
        if self.family == "flamingo":
            raise ConfigError(
                "caption likelihoods are for CoCa and LLaVA models; score Flamingo with vlmkit.eval.fewshot"
            )
        rows = []
        for caption in captions:
            turns = [
                {"from": "human", "value": f"{IMAGE_TOKEN}\n{prompt}"},
                {"from": "gpt", "value": caption},
            ]
            if self.family == "coca":
                turns = coca_turns(turns, is_caption=True)
            rows.append(
                render(
                    turns,
                    self.tokenizer,
                    self.template,
                    num_image_tokens=self.num_image_tokens,
                    image_token_id=self.image_token_id,
                )
            )
        T = max(len(ids) for ids, _ in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(rows), T), pad, dtype=torch.long)
        labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), T), dtype=torch.long)
        for i, (ids, lab) in enumerate(rows):  # right padding
            input_ids[i, : len(ids)], labels[i, : len(lab)] = torch.tensor(ids), torch.tensor(lab)
            attention_mask[i, : len(ids)] = 1
        return input_ids.to(self.device), labels.to(self.device), attention_mask.to(self.device)

    def answer_log_prob(
        self,
        pixels: torch.Tensor,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> torch.Tensor:
        """(B,) summed log-probability of the labelled tokens (from `scoring_batch`) given images (B, 3, S, S);
        differentiable unless called under no_grad / inference_mode."""
        with self._autocast():
            if self.family == "coca":
                hidden, head = (
                    self.model(pixels, input_ids, attention_mask).hidden,
                    self.model.decoder.lm_head,
                )
            else:
                hidden = self.model(input_ids, pixels, attention_mask, logits="none").hidden
                head = self.model.language_model.lm_head
        targets = labels[:, 1:]  # position t predicts token t + 1
        keep = targets != IGNORE_INDEX
        logp = torch.log_softmax(head(hidden[:, :-1][keep]).float(), dim=-1)  # (n, V)
        picked = logp.gather(1, targets[keep][:, None]).squeeze(1)  # (n,)
        rows_of = keep.nonzero()[:, 0]
        return torch.zeros(len(input_ids), device=picked.device).index_add(0, rows_of, picked)

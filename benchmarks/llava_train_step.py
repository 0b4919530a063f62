"""LLaVA training step: vlmkit's `Llava` vs transformers' `LlavaForConditionalGeneration`, same weights.

A random transformers LLaVA (CLIP vision tower + Llama; by default the shape of vlmkit's `llava-tiny`
recipe model without pixel shuffle: a 3-block 192-wide tower on 64 px images with 8 px patches, image
tokens from its first block, a 256-wide 4-layer Llama with a 502-token vocabulary) is saved with
`save_pretrained` and loaded with vlmkit's `load_hf_llava`, so both hold identical weights. Both train on
the same batch: `--batch` conversations of `--min-len` to `--max-len` tokens (one image's placeholders
first), right-padded to the longest, with the loss on a third of the text tokens, as a chat template
gives. A step is forward, the next-token loss over the supervised tokens (transformers: its own loss
from `labels=`), backward, fused AdamW and zero_grad, under bf16 autocast (fp32 weights) or in fp32. Contenders alternate each round (the order
rotates); each figure is the median of `--reps` rounds. transformers runs with "eager" and "sdpa"
attention; the faster is the peer. The first step's losses are printed as a check that both computed
the same thing.

    PYTHONPATH=src python benchmarks/llava_train_step.py --reps 7
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from vlmkit.convert.llava import load_hf_llava
from vlmkit.losses.captioning import next_token_loss
from vlmkit.runtime import describe_machine, resolve_precision

IMAGE_ID = 3


def hf_llava(args):
    import transformers

    vision = transformers.CLIPVisionConfig(
        hidden_size=192, intermediate_size=768, num_hidden_layers=3, num_attention_heads=3,
        image_size=64, patch_size=8, hidden_act="gelu",
    )  # fmt: skip
    text = transformers.LlamaConfig(
        vocab_size=502, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=1024, pad_token_id=0,
    )  # fmt: skip
    cfg = transformers.LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=IMAGE_ID, vision_feature_layer=1,
        image_seq_length=64,
    )  # fmt: skip
    return transformers.LlavaForConditionalGeneration(cfg)


def make_batch(args, num_image_tokens: int):
    g = torch.Generator().manual_seed(0)
    B, T = args.batch, args.max_len
    lengths = torch.randint(args.min_len, args.max_len + 1, (B,), generator=g)
    lengths[0] = T
    ids = torch.randint(4, 502, (B, T), generator=g)
    ids[:, 1 : 1 + num_image_tokens] = IMAGE_ID
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()  # right padding
    ids[mask == 0] = 0
    labels = torch.full((B, T), -100)
    supervised = (torch.rand(B, T, generator=g) < 1 / 3) & (mask == 1)
    supervised[:, : 1 + num_image_tokens] = False
    labels[supervised] = ids[supervised]
    pixels = torch.randn(B, 3, 64, 64, generator=g)
    return ids, mask, labels, pixels


def main() -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--min-len", type=int, default=80, help="shortest conversation, image tokens included")
    p.add_argument("--max-len", type=int, default=160)
    p.add_argument(
        "--precision", choices=["auto", "bf16", "fp32"], default="auto",
        help="auto (default): bf16 autocast where this CPU runs it fast, else fp32",
    )  # fmt: skip
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--hf", default="eager,sdpa", help="transformers attention implementations to time")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    args.precision = resolve_precision(args.precision, "cpu").name
    print(describe_machine(args.precision))
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        hf_llava(args).save_pretrained(tmp)
        models = {"vlmkit": load_hf_llava(tmp).model}
        for impl in filter(None, args.hf.split(",")):
            models[f"hf-{impl}"] = LlavaForConditionalGeneration.from_pretrained(
                tmp, attn_implementation=impl
            )
    n_img = models["vlmkit"].num_image_tokens
    ids, mask, labels, pixels = make_batch(args, n_img)
    autocast = args.precision == "bf16"
    opts = {n: torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True) for n, m in models.items()}

    def step(name: str) -> float:
        model = models[name].train()
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            if name == "vlmkit":
                out = model(ids, pixels, mask, logits="none")
                loss = next_token_loss(out.hidden, labels, model.language_model.lm_head)
            else:  # transformers' own loss: it shifts the labels itself
                loss = model(input_ids=ids, pixel_values=pixels, attention_mask=mask, labels=labels).loss
        loss.backward()
        opts[name].step()
        opts[name].zero_grad(set_to_none=True)
        return loss.item()

    first = {n: step(n) for n in models}  # warm-up, and the same loss from the same weights
    times: dict[str, list[float]] = {n: [] for n in models}
    names = list(models)
    for r in range(args.reps):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            t0 = time.perf_counter()
            step(name)
            times[name].append(time.perf_counter() - t0)
        print(
            f"round {r + 1}/{args.reps}: " + ", ".join(f"{n} {times[n][-1]:.2f}s" for n in names), flush=True
        )

    step_s = {n: statistics.median(t) for n, t in times.items()}
    best = min((n for n in names if n.startswith("hf")), key=step_s.get)
    real = int(mask.sum())
    print(f"\nllava {args.precision}: batch {args.batch}, conversations {args.min_len}-{args.max_len} tokens "
          f"({n_img} image tokens; {1 - real / mask.numel():.0%} of the padded batch is padding), "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")  # fmt: skip
    print("first-step loss: " + ", ".join(f"{n} {v:.4f}" for n, v in first.items()))
    print(f"{'contender':<12}{'step s':>9}{'rows/s':>9}{'vs HF best':>12}")
    for n in names:
        print(f"{n:<12}{step_s[n]:>9.3f}{args.batch / step_s[n]:>9.1f}{step_s[best] / step_s[n]:>11.2f}x")
    result = dict(
        precision=args.precision, batch=args.batch, step_s=step_s, times_s=times, first_loss=first,
        hf_best=best, vs_hf_best=step_s[best] / step_s["vlmkit"], padding=1 - real / mask.numel(),
    )  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()

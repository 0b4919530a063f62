"""Generation throughput: vlmkit's KV cache vs recomputing the prefix, and vlmkit vs transformers' generate.

(a) cache   A random vlmkit `Decoder` (width 512, 8 layers, vocabulary 32000 by default) generates
            `--new-tokens` tokens greedily after a `--prompt`-token prompt, once with its KVCache
            (`use_cache=True`: prefill once, then one token per step) and once recomputing the whole
            sequence every step (`use_cache=False`). Target: the cache >= 3x the tokens/s.
(b) vs HF   A random transformers `LlavaForConditionalGeneration` (CLIP vision tower + Llama of the same
            size as (a)) is saved with `save_pretrained` and loaded with vlmkit's `load_hf_llava`: both hold
            identical weights. Each greedily generates `--new-tokens` tokens for one image and a short
            text prompt (image placeholders already expanded, as transformers' processor does). transformers
            runs with its defaults (DynamicCache), under `torch.inference_mode()`, with "sdpa" and "eager"
            attention; the faster is the peer. Target: vlmkit >= 1.0x. Without convert/llava.py
            (`--peer llama`) the same comparison runs on a transformers `LlamaForCausalLM` loaded with
            convert/llama.py's converter.

Both in fp32 and/or bf16 (weights cast with `.to(torch.bfloat16)`). Each round runs every contender once, in
an order that rotates; tokens/s is new tokens / the median time of the whole `generate` call (prefill
included). Also printed: whether vlmkit's tokens equal transformers' (a check that both computed the same
thing; bf16 may differ after a near tie).

    PYTHONPATH=src python benchmarks/generation_throughput.py --reps 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from vlmkit.models.decoder import Decoder, DecoderConfig
from vlmkit.models.generation import GenerationConfig, generate
from vlmkit.runtime import describe_machine


def time_rounds(contenders: dict[str, Callable[[], torch.Tensor]], reps: int, warmup: int) -> dict:
    """Median seconds per call and the last output of each contender; the order rotates every round."""
    names = list(contenders)
    outputs = {}
    for _ in range(warmup):
        for name in names:
            outputs[name] = contenders[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            t0 = time.perf_counter()
            outputs[name] = contenders[name]()
            times[name].append(time.perf_counter() - t0)
    return {
        n: {"median_s": statistics.median(t), "times_s": t, "tokens": outputs[n]} for n, t in times.items()
    }


def first_difference(a: torch.Tensor, b: torch.Tensor) -> str:
    """'identical', or where two (B, N) generations first differ."""
    if a.shape == b.shape and torch.equal(a, b):
        return "identical"
    n = min(a.shape[1], b.shape[1])
    diff = (a[:, :n] != b[:, :n]).any(0).nonzero()
    return f"differ from step {int(diff[0])}" if len(diff) else f"lengths {a.shape[1]} vs {b.shape[1]}"


def bench_cache(args, dtype: torch.dtype) -> dict:
    torch.manual_seed(0)
    cfg = DecoderConfig(vocab_size=args.vocab, width=args.width, layers=args.layers, heads=args.heads)
    model = Decoder(cfg).eval().to(dtype)
    ids = torch.randint(3, args.vocab, (args.batch, args.prompt), generator=torch.Generator().manual_seed(1))
    contenders = {
        f"use_cache={c}": lambda c=c: generate(
            model, ids, config=GenerationConfig(max_new_tokens=args.new_tokens, use_cache=c)
        )
        for c in (True, False)
    }
    res = time_rounds(contenders, args.reps, args.warmup)
    rate = {n: r["tokens"].numel() / r["median_s"] for n, r in res.items()}
    same = first_difference(res["use_cache=True"]["tokens"], res["use_cache=False"]["tokens"])
    print(f"\n(a) KV cache vs recompute, {args.precision_name}: decoder width {args.width}, {args.layers} layers, "
          f"vocab {args.vocab}, prompt {args.prompt}, batch {args.batch}, {args.new_tokens} new tokens; "
          f"tokens {same}")  # fmt: skip
    print(f"{'contender':<18}{'tokens/s':>10}{'ms/token':>10}")
    for n in res:
        print(f"{n:<18}{rate[n]:>10.1f}{1000 / rate[n] * args.batch:>10.2f}")
    ratio = rate["use_cache=True"] / rate["use_cache=False"]
    print(f"cache / recompute: {ratio:.2f}x")
    return {
        "tokens_per_s": rate,
        "ratio": ratio,
        "tokens": same,
        "times_s": {n: r["times_s"] for n, r in res.items()},
    }


def hf_llava_folder(args, folder: Path) -> tuple[dict, int]:
    """Save a random LlavaForConditionalGeneration (CLIP + Llama); returns the text config and image token id."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text = llama_config(args)
    vision = CLIPVisionConfig(
        hidden_size=args.vision_width, intermediate_size=4 * args.vision_width, num_hidden_layers=args.vision_layers,
        num_attention_heads=args.vision_width // 64, image_size=args.image_size, patch_size=14,
    )  # fmt: skip
    image_token = args.vocab - 1
    cfg = LlavaConfig(vision_config=vision, text_config=LlamaConfig(**text), image_token_index=image_token,
                      image_seq_length=(args.image_size // 14) ** 2)  # fmt: skip
    torch.manual_seed(0)
    LlavaForConditionalGeneration(cfg).save_pretrained(folder)
    return text, image_token


def llama_config(args) -> dict:
    mlp = DecoderConfig(width=args.width).mlp_hidden  # Llama's rule, as vlmkit's default
    return dict(
        vocab_size=args.vocab, hidden_size=args.width, intermediate_size=mlp, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.heads, max_position_embeddings=2048,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip


def bench_vs_hf(args, precisions: list[torch.dtype]) -> dict:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    peer = args.peer
    if peer == "llava":
        try:
            from vlmkit.convert.llava import load_hf_llava
        except ImportError:
            print(
                "\n(b) vlmkit.convert.llava is missing: comparing on LlamaForCausalLM instead (--peer llama)"
            )
            peer = "llama"
    g = torch.Generator().manual_seed(2)
    with tempfile.TemporaryDirectory() as tmp:
        if peer == "llava":
            folder = Path(tmp) / "llava"
            text, image_token = hf_llava_folder(args, folder)
            hf_cls = transformers.LlavaForConditionalGeneration
            ours = load_hf_llava(folder).model.eval()
            n_img = (args.image_size // 14) ** 2
            words = torch.randint(3, args.vocab - 1, (args.batch, args.text_prompt), generator=g)
            # LLaVA-style prompt: start token, the image's placeholders, then the text
            ids = torch.cat(
                [
                    torch.ones(args.batch, 1, dtype=torch.long),
                    torch.full((args.batch, n_img), image_token),
                    words,
                ],
                1,
            )
            pixels = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=g)
        else:
            from vlmkit.convert.llama import decoder_config_from_hf, decoder_state_from_hf

            folder = Path(tmp) / "llama"
            torch.manual_seed(0)
            transformers.LlamaForCausalLM(transformers.LlamaConfig(**llama_config(args))).save_pretrained(
                folder
            )
            hf_cls = transformers.LlamaForCausalLM
            hf0 = hf_cls.from_pretrained(folder)
            ours = Decoder(decoder_config_from_hf(hf0.config.to_dict())).eval()
            ours.load_state_dict(decoder_state_from_hf(hf0.state_dict(), "model."))
            del hf0
            ids = torch.randint(3, args.vocab, (args.batch, args.prompt), generator=g)
            pixels = None
        hf_models = {
            impl: hf_cls.from_pretrained(folder, attn_implementation=impl).eval()
            for impl in args.hf.split(",")
        }
    mask = torch.ones_like(ids)
    eos, pad = 2, 0
    results = {}
    for dtype in precisions:
        name = "bf16" if dtype == torch.bfloat16 else "fp32"
        ours = ours.to(dtype)
        px = pixels.to(dtype) if pixels is not None else None
        gen_cfg = GenerationConfig(max_new_tokens=args.new_tokens, eos_token_id=eos, pad_token_id=pad)

        def run_ours(ours=ours, px=px, gen_cfg=gen_cfg):
            if px is not None:
                return ours.generate(ids, px, config=gen_cfg)
            return generate(ours, ids, config=gen_cfg)

        contenders = {"vlmkit": run_ours}
        for impl, m in hf_models.items():
            m.to(dtype)

            def run_hf(m=m, px=px):
                extra = {"pixel_values": px} if px is not None else {}
                with torch.inference_mode():
                    out = m.generate(
                        input_ids=ids, attention_mask=mask, max_new_tokens=args.new_tokens, do_sample=False,
                        num_beams=1, eos_token_id=eos, pad_token_id=pad, **extra,
                    )  # fmt: skip
                return out[:, ids.shape[1] :]

            contenders[f"hf-{impl}"] = run_hf
        res = time_rounds(contenders, args.reps, args.warmup)
        rate = {n: r["tokens"].numel() / r["median_s"] for n, r in res.items()}
        hf_names = [n for n in res if n.startswith("hf")]
        best = max(hf_names, key=lambda n: rate[n])
        same = first_difference(res["vlmkit"]["tokens"], res[best]["tokens"])
        print(f"\n(b) vlmkit vs transformers ({peer}), {name}: prompt {ids.shape[1]} tokens"
              f"{f' ({n_img} image tokens)' if peer == 'llava' else ''}, batch {args.batch}, "
              f"{args.new_tokens} new tokens (generated {res['vlmkit']['tokens'].shape[1]}); "
              f"vlmkit's tokens vs {best}: {same}")  # fmt: skip
        print(f"{'contender':<12}{'tokens/s':>10}{'vs HF best':>12}")
        for n in res:
            print(f"{n:<12}{rate[n]:>10.1f}{rate[n] / rate[best]:>11.2f}x")
        results[name] = {
            "peer": peer,
            "tokens_per_s": rate,
            "vs_hf_best": rate["vlmkit"] / rate[best],
            "tokens": same,
            "times_s": {n: r["times_s"] for n, r in res.items()},
        }
    return results


def main() -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", nargs="+", default=["cache", "hf"], choices=["cache", "hf"])
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument(
        "--prompt", type=int, default=64, help="prompt tokens for (a) and for (b) with --peer llama"
    )
    p.add_argument("--text-prompt", type=int, default=16, help="(b) LLaVA: text tokens after the image")
    p.add_argument(
        "--image-size", type=int, default=112, help="(b) LLaVA: 112 px / patch 14 = 64 image tokens"
    )
    p.add_argument("--vision-width", type=int, default=384)
    p.add_argument("--vision-layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    p.add_argument("--peer", default="llava", choices=["llava", "llama"], help="(b): the transformers model")
    p.add_argument("--hf", default="sdpa,eager", help="transformers attention implementations to time")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(describe_machine(", ".join(args.precision)))
    dtypes = [torch.bfloat16 if x == "bf16" else torch.float32 for x in args.precision]
    results: dict = {}
    with torch.inference_mode():
        if "cache" in args.parts:
            for dtype, name in zip(dtypes, args.precision):
                args.precision_name = name
                results[f"cache/{name}"] = bench_cache(args, dtype)
    if "hf" in args.parts:
        results["vs_hf"] = bench_vs_hf(args, dtypes)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()

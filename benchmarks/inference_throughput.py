"""Inference throughput: vlmkit vs transformers encoding images and texts with the same loaded weights.

A transformers `CLIPModel` (clip-B-32 architecture by default, random weights, or `--model` a
Hugging Face folder) is saved to a folder, and vlmkit loads that folder with `load_pretrained`: both
then hold identical weights. Each round times, for every contender in turn (the order rotates):

  images  `encode_image` / `get_image_features` on a batch of 224 px images;
  texts   `encode_text` / `get_text_features` on a batch of captions tokenized the usual way, padded
          to the context length (77) with an attention mask for transformers, as its processor does.

in fp32 and in bf16 (weights and inputs cast to bfloat16, as `torch_dtype=torch.bfloat16` loads
them), under `torch.inference_mode()`. transformers runs with "eager" and with "sdpa" attention;
the faster is the peer. Prints items/s (median of rounds), the ratio to transformers' best, and the
largest difference between the two libraries' features as a check that they computed the same thing.
With `--compile`, vlmkit and transformers (SDPA) also run under `torch.compile` with inductor's weight
freezing, and the compiled transformers counts among the peers.

    PYTHONPATH=src python benchmarks/inference_throughput.py --reps 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vlmkit.convert import load_pretrained
from vlmkit.runtime import describe_machine, resolve_precision

B32 = dict(
    text_config=dict(
        vocab_size=49408, hidden_size=512, intermediate_size=2048, num_attention_heads=8,
        num_hidden_layers=12, max_position_embeddings=77, hidden_act="quick_gelu",
        bos_token_id=49406, eos_token_id=49407, pad_token_id=1,
    ),
    vision_config=dict(
        hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
        image_size=224, patch_size=32, hidden_act="quick_gelu",
    ),
    projection_dim=512,
)  # fmt: skip


def captions(batch: int, context: int, bos: int, eos: int, pad: int, seed: int = 0):
    """Token ids of captions 8-24 tokens long (a typical alt-text), padded to `context`."""
    rng = np.random.default_rng(seed)
    ids = torch.full((batch, context), pad, dtype=torch.long)
    mask = torch.zeros(batch, context, dtype=torch.long)
    for row in range(batch):
        n = int(rng.integers(8, 25))
        ids[row, 0] = bos
        ids[row, 1 : n - 1] = torch.from_numpy(rng.integers(300, 49000, n - 2))
        ids[row, n - 1] = eos
        mask[row, :n] = 1
    return ids, mask


def pooled(out) -> torch.Tensor:
    return getattr(out, "pooler_output", out)  # transformers 5 returns an output object


def main() -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a Hugging Face CLIP folder (default: random clip-B-32 weights)")
    p.add_argument("--image-batch", type=int, default=32)
    p.add_argument("--text-batch", type=int, default=128)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument(
        "--precision", nargs="+", choices=["fp32", "bf16"],
        help="default: fp32, and bf16 too where this CPU runs it fast (emulated bf16 is 100-400x slower)",
    )  # fmt: skip
    p.add_argument("--hf", default="eager,sdpa", help="transformers attention implementations to time")
    p.add_argument(
        "--compile", action="store_true",
        help="also time torch.compile (inductor, frozen weights) of vlmkit and of the last transformers contender",
    )  # fmt: skip
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.precision:
        args.precision = ["fp32"] + (["bf16"] if resolve_precision("auto", "cpu").bf16 else [])
    print(describe_machine(", ".join(args.precision)))
    from transformers import CLIPConfig, CLIPModel

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model
        if folder is None:
            torch.manual_seed(0)
            folder = str(Path(tmp) / "clip-B-32")
            CLIPModel(CLIPConfig(**B32)).save_pretrained(folder)
        hf_models = {
            impl: CLIPModel.from_pretrained(folder, attn_implementation=impl).eval()
            for impl in args.hf.split(",")
            if impl
        }
        ours = load_pretrained(folder).model.eval()
    cfg = next(iter(hf_models.values())).config
    tcfg, vcfg = cfg.text_config, cfg.vision_config
    g = torch.Generator().manual_seed(0)
    images = torch.randn(args.image_batch, 3, vcfg.image_size, vcfg.image_size, generator=g)
    ids, mask = captions(
        args.text_batch, tcfg.max_position_embeddings, tcfg.bos_token_id, tcfg.eos_token_id, tcfg.pad_token_id
    )

    results = {}
    for precision in args.precision:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        contenders = {"vlmkit": ours.to(dtype)} | {f"hf-{k}": m.to(dtype) for k, m in hf_models.items()}
        x = images.to(dtype)
        fns = {}  # (contender, task) -> a function of no arguments that encodes the batch
        for name, model in contenders.items():
            if name == "vlmkit":
                fns[name, "images"] = lambda m=model, x=x: m.encode_image(x)
                fns[name, "texts"] = lambda m=model: m.encode_text(ids)
            else:
                fns[name, "images"] = lambda m=model, x=x: pooled(m.get_image_features(pixel_values=x))
                fns[name, "texts"] = lambda m=model: pooled(
                    m.get_text_features(input_ids=ids, attention_mask=mask)
                )
        # inductor with frozen weights (prepacked for oneDNN), for vlmkit and the last transformers contender
        if args.compile:
            from torch._inductor import config as inductor_config

            inductor_config.freezing = True
            torch._dynamo.reset()  # the weights of the previous precision were frozen into its graphs
            for name in ("vlmkit", list(contenders)[-1]):
                for task in ("images", "texts"):
                    fns[f"{name}-compile", task] = torch.compile(fns[name, task])
        names = list(dict.fromkeys(n for n, _ in fns))

        with torch.inference_mode():
            check = {}
            for task in ("images", "texts"):
                a, b = fns["vlmkit", task]().float(), fns[names[1], task]().float()
                check[task] = (F.normalize(a, dim=-1) - F.normalize(b, dim=-1)).abs().max().item()
            compile_s = {}
            for name in names:  # compiled contenders compile on their first call
                if name.endswith("-compile"):
                    t0 = time.perf_counter()
                    fns[name, "images"](), fns[name, "texts"]()
                    compile_s[name] = time.perf_counter() - t0
            times: dict[tuple[str, str], list[float]] = {}
            for r in range(args.reps):
                k = r % len(names)
                for name in names[k:] + names[:k]:
                    for task in ("images", "texts"):
                        t0 = time.perf_counter()
                        fns[name, task]()
                        times.setdefault((name, task), []).append(time.perf_counter() - t0)
        batch = {"images": args.image_batch, "texts": args.text_batch}
        rate = {key: batch[key[1]] / statistics.median(v) for key, v in times.items()}
        print(f"\n{precision}: image batch {args.image_batch}, text batch {args.text_batch} "
              f"(captions 8-24 tokens padded to {tcfg.max_position_embeddings}), {torch.get_num_threads()} threads, "
              f"torch {torch.__version__}; largest feature difference vlmkit vs transformers "
              f"(normalised): images {check['images']:.1e}, texts {check['texts']:.1e}")  # fmt: skip
        if compile_s:
            print(
                "compile time (first call, both tasks): "
                + ", ".join(f"{n} {t:.0f}s" for n, t in compile_s.items())
            )
        print(f"{'contender':<16}{'images/s':>10}{'vs HF best':>12}{'texts/s':>10}{'vs HF best':>12}")
        best = {t: max(rate[(n, t)] for n in names if n.startswith("hf")) for t in ("images", "texts")}
        for n in names:
            print(f"{n:<16}{rate[(n, 'images')]:>10.1f}{rate[(n, 'images')] / best['images']:>11.2f}x"
                  f"{rate[(n, 'texts')]:>10.1f}{rate[(n, 'texts')] / best['texts']:>11.2f}x")  # fmt: skip
        results[precision] = {
            "items_per_s": {f"{n}/{t}": v for (n, t), v in rate.items()},
            "vs_hf_best": {f"{n}/{t}": rate[(n, t)] / best[t] for n in names for t in ("images", "texts")},
            "compile_s": compile_s,
            "max_feature_difference": check,
            "times_s": {f"{n}/{t}": v for (n, t), v in times.items()},
        }
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()

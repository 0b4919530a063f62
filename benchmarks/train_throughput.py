"""Training throughput of vlmkit's CLIP against transformers' `CLIPModel` with the same architecture.

Both models are built from one vlmkit config, trained in the same process on the same batch and precision,
and timed in alternating rounds (so background load hits both alike); each figure is the median of `--reps`
rounds of `--steps` steps after `--warmup` steps. A step is forward (both towers) + vlmkit's `ClipLoss`
+ backward + AdamW. transformers is measured with eager and SDPA attention and the faster one is the peer.

Model FLOPs utilisation (MFU) = analytic training FLOPs per pair * pairs/s / matmul peak, where the peak is the
median of large square matmuls at the same precision, measured between the rounds of this run.

    PYTHONPATH=src python benchmarks/train_throughput.py --model clip-B-32 --batch 64 --precision bf16

On a GPU (`--device cuda`) the same script measures training MFU against the GPU's measured bf16 matmul peak,
e.g. clip-B-16 compiled: `--model clip-B-16 --device cuda --batch 256 --precision bf16 --compile --no-eager
--hf sdpa`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from vlmkit.losses import ClipLoss
from vlmkit.models import CLIPConfig, create_model, get_model_config
from vlmkit.runtime import cpu_info, describe_machine, resolve_precision

HF_ACT = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_tanh": "gelu_pytorch_tanh"}


def hf_clip(cfg: CLIPConfig, attn_implementation: str) -> nn.Module:
    """transformers' CLIPModel with exactly the architecture of a vlmkit CLIP config."""
    from transformers import CLIPConfig as HFCLIPConfig
    from transformers import CLIPModel

    v, t = cfg.vision, cfg.text
    clip_like = v.pool == "cls" and v.class_token and v.ln_pre and v.proj and v.stem == "patch" and t.causal
    if cfg.loss != "clip" or not clip_like:
        raise SystemExit(
            "only CLIP-style models (patch stem, class token, causal text) have a CLIPModel twin"
        )
    text_config = dict(
        vocab_size=t.vocab_size, hidden_size=t.width, intermediate_size=int(t.width * t.mlp_ratio),
        num_hidden_layers=t.layers, num_attention_heads=t.heads, max_position_embeddings=t.context_length,
        hidden_act=HF_ACT[t.act], layer_norm_eps=t.norm_eps, projection_dim=cfg.embed_dim,
        eos_token_id=t.eot_token_id, pad_token_id=t.pad_token_id,
    )  # fmt: skip
    vision_config = dict(
        hidden_size=v.width, intermediate_size=int(v.width * v.mlp_ratio), num_hidden_layers=v.layers,
        num_attention_heads=v.heads, image_size=v.image_size, patch_size=v.patch_size,
        hidden_act=HF_ACT[v.act], layer_norm_eps=v.norm_eps, projection_dim=cfg.embed_dim,
    )  # fmt: skip
    hf_cfg = HFCLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=cfg.embed_dim)
    return CLIPModel._from_config(hf_cfg, attn_implementation=attn_implementation)


def training_flops_per_pair(cfg: CLIPConfig, text_lengths: list[int] | None = None) -> float:
    """Analytic matmul FLOPs needed to train on one image-text pair (forward + backward = 3 x forward).

    Per tower: 6 * P * T, with P the matmul parameters one token passes through (per layer qkv 3d^2, out
    d^2, MLP 2*d*h; plus the patch projection, applied to the N patch tokens, and the output projection,
    applied to the one pooled token), plus 3 * attention scores and values, 4 * T^2 * d per layer forward
    (half for the causal text tower, whose masked half is skipped). Each tower is read out at one token,
    so its last layer needs keys and values (2d^2) for every token but the query, output projection, MLP
    and attention row for the pooled token alone: that work on the other T - 1 tokens is not counted
    (7% of the total for clip-B-32). A causal text tower read out at the end-of-text token needs only the
    tokens up to it: T is each caption's length there (`text_lengths`, averaged over the pairs; default the
    context length). Norms, activations, softmax, embeddings, the (B, B) logits and the optimizer are not
    counted.
    """
    total = 0.0
    for tower in (cfg.vision, cfg.text):
        d, h, L = tower.width, int(tower.width * tower.mlp_ratio), tower.layers
        layer_params = 4 * d * d + 2 * d * h
        if tower is cfg.vision:
            n_patch = tower.grid_size**2
            lengths = [n_patch + int(tower.class_token)]
            total += 6 * (3 * tower.patch_size**2 * d) * n_patch
        elif tower.causal and text_lengths is not None:
            lengths = list(text_lengths)
        else:
            lengths = [tower.context_length]
        for T in lengths:  # the mean over the pairs
            attn = 4 * T * T * d / (2 if tower is cfg.text and tower.causal else 1)
            tower_flops = 6 * layer_params * (L - 1) * T + 3 * attn * (L - 1)  # all but the last layer
            tower_flops += 6 * (2 * d * d * T + 2 * d * d + 2 * d * h) + 3 * 4 * T * d  # the last layer
            total += tower_flops / len(lengths)
        total += 6 * d * cfg.embed_dim * tower.proj
    return total


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(
    dtype: torch.dtype,
    sizes: tuple[int, ...] = (2048, 4096),
    reps: int = 3,
    device: torch.device | None = None,
) -> float:
    """FLOP/s of the fastest of a few large square matmuls (median of `reps` each)."""
    device = device or torch.device("cpu")
    if device.type == "cuda":
        sizes = (8192, 16384)
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
        a @ b  # warm-up
        times = []
        for _ in range(reps):
            sync(device)
            t0 = time.perf_counter()
            a @ b
            sync(device)
            times.append(time.perf_counter() - t0)
        best = max(best, 2 * n**3 / statistics.median(times))
    return best


class Contender:
    """A model, its AdamW and a function that runs one training step on (images, text)."""

    def __init__(
        self,
        name: str,
        model: nn.Module,
        forward: Callable,
        precision: str,
        fused_adamw: bool,
        device: torch.device,
    ):
        self.device = device
        model = model.to(device)
        self.name, self.model, self.forward = name, model.train(), forward
        self.autocast = precision == "bf16"
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=fused_adamw)
        self.loss = ClipLoss()  # one loss for every contender
        self.step_times: list[float] = []

    def step(self, images: torch.Tensor, text: torch.Tensor) -> float:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            image_features, text_features, logit_scale = self.forward(images, text)
            loss = self.loss(image_features, text_features, logit_scale)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()


def vlmkit_contender(name: str, cfg: CLIPConfig, args) -> Contender:
    model = create_model(args.model, **args.override)
    assert model.cfg == cfg
    run = torch.compile(model) if name.endswith("compile") else model

    def forward(images, text):
        out = run(images, text)
        return out.image_features, out.text_features, out.logit_scale

    return Contender(name, model, forward, args.precision, args.fused_adamw, args.device)


def hf_contender(name: str, cfg: CLIPConfig, args) -> Contender:
    model = hf_clip(cfg, attn_implementation=name.split("-")[1])

    def forward(images, text):
        out = model(input_ids=text, pixel_values=images)
        return out.image_embeds, out.text_embeds, model.logit_scale.exp()

    return Contender(name, model, forward, args.precision, args.fused_adamw, args.device)


def make_batch(cfg: CLIPConfig, batch: int, captions: str = "random") -> tuple[torch.Tensor, torch.Tensor]:
    """Random images, and token rows of the context length whose end-of-text token sits at a random position
    from a quarter of the context to its end (`captions="random"`) or at the very end (`"full"`)."""
    v, t = cfg.vision, cfg.text
    images = torch.randn(batch, 3, v.image_size, v.image_size)  # (B, 3, H, W)
    text = torch.randint(3, t.vocab_size, (batch, t.context_length))  # (B, T)
    if captions == "full":
        eot = torch.full((batch,), t.context_length - 1)
    else:
        eot = torch.randint(t.context_length // 4, t.context_length, (batch,))
    text[torch.arange(batch), eot] = t.eot_token_id
    return images, text


def text_lengths(cfg: CLIPConfig, text: torch.Tensor) -> list[int]:
    """Each row's tokens up to and including its first end-of-text token."""
    is_eot = text == cfg.text.eot_token_id
    return (is_eot.int().argmax(dim=1) + 1).tolist()


def parse_overrides(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        out[key] = value
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="clip-B-32", help="a vlmkit model name (CLIP family)")
    p.add_argument(
        "--set", dest="override", nargs="*", default=[], help="config overrides, e.g. vision.layers=6"
    )
    p.add_argument("--batch", type=int, default=64)
    p.add_argument(
        "--captions", choices=["random", "full"], default="random",
        help="end-of-text at a random position from a quarter of the context on (random) or at its end (full)",
    )  # fmt: skip
    p.add_argument(
        "--precision", choices=["auto", "bf16", "fp32"], default="auto",
        help="bf16 = autocast, fp32 weights; auto (default) = bf16 where this CPU runs it fast",
    )  # fmt: skip
    p.add_argument("--reps", type=int, default=5, help="timed rounds; each figure is their median")
    p.add_argument("--steps", type=int, default=1, help="training steps per timed round")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per contender first")
    p.add_argument("--compile", action="store_true", help="also time vlmkit under torch.compile")
    p.add_argument("--no-eager", action="store_true", help="with --compile, skip eager vlmkit")
    p.add_argument("--hf", default="eager,sdpa", help="transformers attention implementations to time")
    p.add_argument("--fused-adamw", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    args.override = parse_overrides(args.override)
    if args.threads:
        torch.set_num_threads(args.threads)

    args.device = torch.device(args.device)
    args.precision = resolve_precision(args.precision, args.device).name
    print(
        describe_machine(args.precision)
        if args.device.type == "cpu"
        else torch.cuda.get_device_name(args.device)
    )
    torch.manual_seed(0)
    cfg = get_model_config(args.model, **args.override)
    images, text = make_batch(cfg, args.batch, args.captions)
    images, text = images.to(args.device), text.to(args.device)
    lengths = text_lengths(cfg, text)
    flops = training_flops_per_pair(cfg, lengths)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32

    names = ([] if args.no_eager and args.compile else ["vlmkit"]) + (
        ["vlmkit-compile"] if args.compile else []
    )
    names += [f"hf-{impl}" for impl in args.hf.split(",") if impl]
    contenders, warmup_s = [], {}
    for name in names:
        c = (vlmkit_contender if name.startswith("vlmkit") else hf_contender)(name, cfg, args)
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            c.step(images, text)
        sync(args.device)
        warmup_s[name] = time.perf_counter() - t0
        contenders.append(c)
        print(f"{name}: {sum(p.numel() for p in c.model.parameters()) / 1e6:.1f}M params, "
              f"warm-up {warmup_s[name]:.1f}s", flush=True)  # fmt: skip

    peaks = []
    for r in range(args.reps):
        peaks.append(matmul_peak(dtype, device=args.device))
        k = r % len(contenders)  # rotate the order so no contender always runs first
        for c in contenders[k:] + contenders[:k]:
            sync(args.device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                c.step(images, text)
            sync(args.device)
            c.step_times.append((time.perf_counter() - t0) / args.steps)
        print(f"round {r + 1}/{args.reps}: " + ", ".join(f"{c.name} {c.step_times[-1]:.2f}s" for c in contenders),
              flush=True)  # fmt: skip
    peak = statistics.median(peaks)

    # Headline: medians. Background load only ever slows a round, so the fastest round (against the
    # highest peak) is shown beside it as a check on how much the load moved the medians.
    rows = {}
    for c in contenders:
        step_s, best_s = statistics.median(c.step_times), min(c.step_times)
        rows[c.name] = dict(
            step_s=step_s, pairs_per_s=args.batch / step_s, gflops=flops * args.batch / step_s / 1e9,
            mfu=flops * args.batch / step_s / peak, best_pairs_per_s=args.batch / best_s,
            best_mfu=flops * args.batch / best_s / max(peaks),
        )  # fmt: skip
    hf_best = max((n for n in rows if n.startswith("hf")), key=lambda n: rows[n]["pairs_per_s"], default=None)
    hf_best_round = max((rows[n]["best_pairs_per_s"] for n in rows if n.startswith("hf")), default=None)
    for row in rows.values():
        row["vs_hf_best"] = row["pairs_per_s"] / rows[hf_best]["pairs_per_s"] if hf_best else None
        row["best_vs_hf_best"] = row["best_pairs_per_s"] / hf_best_round if hf_best_round else None

    v, t = cfg.vision, cfg.text
    print(f"\n{args.model} {args.override or ''}: image {v.image_size}/{v.patch_size} ViT {v.width}x{v.layers} "
          f"({v.heads} heads), text {t.width}x{t.layers} ({t.heads} heads, ctx {t.context_length}), "
          f"embed {cfg.embed_dim}; captions {args.captions} ({statistics.mean(lengths):.1f} tokens on average "
          f"to end-of-text); batch {args.batch}, {args.precision}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, {cpu_info().model}")  # fmt: skip
    print(f"training FLOPs per pair {flops / 1e9:.2f} GFLOP; {args.precision} matmul peak {peak / 1e9:.0f} GFLOP/s "
          f"(median of {args.reps}: {', '.join(f'{x / 1e9:.0f}' for x in peaks)})")  # fmt: skip
    ratio = lambda x: f"{x:.2f}x" if x else "-"
    print(
        f"{'':<16}{'--------------- median of rounds ---------------':>50}{'----- fastest round -----':>28}"
    )
    print(f"{'contender':<16}{'step s':>9}{'pairs/s':>9}{'GFLOP/s':>9}{'MFU':>8}{'vs HF best':>12}"
          f"{'pairs/s':>11}{'MFU':>8}{'vs HF':>9}")  # fmt: skip
    for n, row in rows.items():
        print(f"{n:<16}{row['step_s']:>9.2f}{row['pairs_per_s']:>9.2f}{row['gflops']:>9.0f}{row['mfu']:>8.1%}"
              f"{ratio(row['vs_hf_best']):>12}{row['best_pairs_per_s']:>11.2f}{row['best_mfu']:>8.1%}"
              f"{ratio(row['best_vs_hf_best']):>9}")  # fmt: skip

    # Paired: each round's fastest transformers step over vlmkit's in the same round. Load that hits a whole
    # round cancels out, so this moves less between runs than the ratio of medians.
    hf = [c for c in contenders if c.name.startswith("hf")]
    paired = {}
    for c in contenders:
        if hf and not c.name.startswith("hf"):
            per_round = [min(h.step_times[r] for h in hf) / c.step_times[r] for r in range(args.reps)]
            paired[c.name] = statistics.median(per_round)
            print(f"{c.name} vs HF best, paired by round: median {paired[c.name]:.2f}x "
                  f"(rounds: {', '.join(f'{x:.2f}' for x in per_round)})")  # fmt: skip

    result = dict(
        model=args.model, paired_vs_hf_best=paired, overrides=args.override, batch=args.batch, precision=args.precision,
        captions=args.captions, mean_text_length=statistics.mean(lengths),
        threads=torch.get_num_threads(), torch=torch.__version__, cpu=cpu_info().describe(), flops_per_pair=flops,
        matmul_peak=peak, matmul_peaks=peaks, hf_best=hf_best, warmup_s=warmup_s, results=rows,
        step_times={c.name: c.step_times for c in contenders},
    )  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()

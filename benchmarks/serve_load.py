"""Load on `vlmkit serve`: continuous batching vs one request at a time, and batched embeddings.

A `vlmkit serve` process (its own interpreter; torch threads: its default, the cores less one) serves a random
`llava-tiny` as `llava-tiny-shapes` configures it (64 px ViT, 16 image tokens, a 256-wide 4-layer decoder) and a
random `clip-tiny`; this process is the client
(asyncio + httpx on 127.0.0.1, streaming, `ignore_eos` so every answer has `--max-tokens` tokens).

(a) chat     at concurrency 1, 2, 4, 8, 16: each of C workers sends requests back to back for `--seconds`;
             time to first token (TTFT), time per output token (TPOT = (E2E - TTFT) / (tokens - 1)), end-to-end
             latency p50 / p99, requests/s and output tokens/s. Target: at 8, output tokens/s >= 3x at 1.
             The peer: the same server with `--slots 1` (no batching) at concurrency 8.
(b) burst    64 requests at once against `--slots 8 --max-waiting 32`: every one completes or gets a 429, none
             hangs (each has a 120 s limit), and the server's resident memory before and after is printed.
(c) embed    /v1/embeddings with one image per request, concurrency 16 vs 1. Target: >= 3x.

    PYTHONPATH=src python benchmarks/serve_load.py            # about 3 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

from vlmkit.runtime import describe_machine


def build_models(root: Path) -> tuple[Path, Path]:
    from vlmkit.data.chat import IMAGE_TOKEN
    from vlmkit.data.tokenizer import Tokenizer
    from vlmkit.data.transforms import PreprocessConfig
    from vlmkit.models.pretrained import save_pretrained
    from vlmkit.models.registry import create_model

    words = "red green blue yellow circle square star triangle left right top bottom small large what is the".split()
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(words, 12)) for _ in range(2000)]
    tok = Tokenizer.train(texts, vocab_size=512, context_length=32, extra_special_tokens=[IMAGE_TOKEN])
    torch.manual_seed(0)
    from vlmkit.recipes import RECIPES

    shapes = RECIPES["llava-tiny-shapes"][
        "model_overrides"
    ]  # what `vlmkit train --recipe llava-tiny-shapes` makes
    llava = create_model("llava-tiny", **{**shapes, "decoder.vocab_size": tok.vocab_size,
                                          "image_token_id": tok.token_to_id(IMAGE_TOKEN)})  # fmt: skip
    clip = create_model("clip-tiny", **{"text.vocab_size": tok.vocab_size})
    pre = PreprocessConfig(image_size=64)
    return (save_pretrained(llava, root / "llava-tiny", tok, pre),
            save_pretrained(clip, root / "clip-tiny", tok, pre))  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, models: list[Path], *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [
            sys.executable,
            "-m",
            "vlmkit",
            "serve",
            "--port",
            str(self.port),
            "--precision",
            "fp32",
            *args,
        ]
        for m in models:
            cmd += ["--model", str(m)]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=os.environ.copy()
        )
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/v1/models", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
            if self.proc.poll() is not None:
                raise RuntimeError(self.proc.stderr.read().decode())
        raise RuntimeError("the server did not start")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


def data_url(seed: int, size: int = 64) -> str:
    im = Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def chat_body(seed: int, max_tokens: int) -> dict:
    return {"model": "llava-tiny", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(seed)}},
                                                      {"type": "text", "text": "what is the large shape?"}]}]}  # fmt: skip


async def one_chat(client: httpx.AsyncClient, body: dict) -> dict:
    t0 = time.perf_counter()
    ttft, tokens, status = None, 0, 200
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return {"status": r.status_code}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content") and ttft is None:
                ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    e2e = time.perf_counter() - t0
    return {"status": status, "ttft": ttft or e2e, "e2e": e2e, "tokens": tokens}


async def closed_loop(url: str, concurrency: int, seconds: float, max_tokens: int) -> dict:
    results: list[dict] = []
    end = time.perf_counter() + seconds

    async def worker(w: int):
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            i = 0
            while time.perf_counter() < end:
                results.append(await one_chat(client, chat_body(w * 1000 + i, max_tokens)))
                i += 1

    t0 = time.perf_counter()
    await asyncio.gather(*[worker(w) for w in range(concurrency)])
    wall = time.perf_counter() - t0
    ok = [r for r in results if r["status"] == 200]
    tpot = [(r["e2e"] - r["ttft"]) / (r["tokens"] - 1) for r in ok if r["tokens"] > 1]
    e2e = sorted(r["e2e"] for r in ok)
    return {"concurrency": concurrency, "requests": len(ok), "errors": len(results) - len(ok),
            "ttft_ms": 1000 * statistics.median(r["ttft"] for r in ok), "tpot_ms": 1000 * statistics.median(tpot),
            "e2e_p50_s": e2e[len(e2e) // 2], "e2e_p99_s": e2e[min(len(e2e) - 1, int(0.99 * len(e2e)))],
            "requests_per_s": len(ok) / wall, "output_tokens_per_s": sum(r["tokens"] for r in ok) / wall}  # fmt: skip


async def burst(url: str, n: int, max_tokens: int) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=n)) as client:
        tasks = [asyncio.wait_for(one_chat(client, chat_body(i, max_tokens)), 120) for i in range(n)]
        results = await asyncio.gather(*tasks, return_exceptions=True)
    statuses = [r["status"] if isinstance(r, dict) else type(r).__name__ for r in results]
    return {"sent": n, "completed": statuses.count(200), "429": statuses.count(429),
            "other": [s for s in statuses if s not in (200, 429)]}  # fmt: skip


async def embed_load(url: str, concurrency: int, seconds: float) -> float:
    count = 0
    end = time.perf_counter() + seconds
    images = [data_url(i) for i in range(64)]

    async def worker(w: int):
        nonlocal count
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            i = 0
            while time.perf_counter() < end:
                body = {"model": "clip-tiny", "input": [{"content": [{"type": "image_url",
                                                                      "image_url": {"url": images[(w + i) % 64]}}]}]}  # fmt: skip
                r = await client.post("/v1/embeddings", json=body)
                assert r.status_code == 200, r.text
                count += 1
                i += 1

    t0 = time.perf_counter()
    await asyncio.gather(*[worker(w) for w in range(concurrency)])
    return count / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=12.0, help="per concurrency level")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--levels", default="1,2,4,8,16")
    ap.add_argument("--out", help="write the results as JSON")
    args = ap.parse_args()
    print(describe_machine())
    results: dict = {"machine": describe_machine(), "max_tokens": args.max_tokens}
    with tempfile.TemporaryDirectory() as tmp:
        llava, clip = build_models(Path(tmp))
        server = ServerProcess([llava, clip], "--slots", "16", "--max-waiting", "32")
        try:
            asyncio.run(closed_loop(server.url, 2, 3, args.max_tokens))  # warm-up
            rows = [asyncio.run(closed_loop(server.url, c, args.seconds, args.max_tokens))
                    for c in map(int, args.levels.split(","))]  # fmt: skip
            results["chat"] = rows
            print(f"{'conc':>4} {'req':>5} {'TTFT ms':>8} {'TPOT ms':>8} {'E2E p50':>8} {'E2E p99':>8} "
                  f"{'req/s':>6} {'tok/s':>7}")  # fmt: skip
            for r in rows:
                print(f"{r['concurrency']:>4} {r['requests']:>5} {r['ttft_ms']:>8.1f} {r['tpot_ms']:>8.1f} "
                      f"{r['e2e_p50_s']:>8.2f} {r['e2e_p99_s']:>8.2f} {r['requests_per_s']:>6.2f} "
                      f"{r['output_tokens_per_s']:>7.1f}")  # fmt: skip
            by = {r["concurrency"]: r for r in rows}
            if 1 in by and 8 in by:
                ratio = by[8]["output_tokens_per_s"] / by[1]["output_tokens_per_s"]
                results["ratio_8_vs_1"] = ratio
                print(f"output tokens/s at 8 concurrent / 1 at a time: {ratio:.2f}x (target >= 3x)")
            one = asyncio.run(embed_load(server.url, 1, args.seconds / 2))
            sixteen = asyncio.run(embed_load(server.url, 16, args.seconds / 2))
            results["embeddings"] = {"one_at_a_time_per_s": one, "concurrent16_per_s": sixteen,
                                     "ratio": sixteen / one}  # fmt: skip
            print(f"image embeddings/s: 1 at a time {one:.1f}, 16 concurrent {sixteen:.1f}: "
                  f"{sixteen / one:.2f}x (target >= 3x)")  # fmt: skip
        finally:
            server.stop()
        server = ServerProcess([llava], "--slots", "8", "--max-waiting", "32")
        try:
            before = server.rss_mb()
            b = asyncio.run(burst(server.url, 64, args.max_tokens))
            b2 = asyncio.run(burst(server.url, 64, args.max_tokens))
            after = server.rss_mb()
            results["burst"] = {**b, "second": b2, "rss_mb_before": before, "rss_mb_after": after}
            print(f"burst of 64 (8 slots, 32 waiting), twice: {b['completed']} + {b2['completed']} completed, "
                  f"{b['429']} + {b2['429']} got 429, other {b['other'] + b2['other']}; server memory "
                  f"{before:.0f} -> {after:.0f} MB")  # fmt: skip
        finally:
            server.stop()
        server = ServerProcess([llava], "--slots", "1", "--max-waiting", "32")
        try:
            peer = asyncio.run(closed_loop(server.url, 8, args.seconds, args.max_tokens))
            results["peer_slots1_c8"] = peer
            if 8 in by:
                print(f"peer (--slots 1, no batching) at 8 concurrent: {peer['output_tokens_per_s']:.1f} tok/s; "
                      f"continuous batching: {by[8]['output_tokens_per_s'] / peer['output_tokens_per_s']:.2f}x")  # fmt: skip
        finally:
            server.stop()
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

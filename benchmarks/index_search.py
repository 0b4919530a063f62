"""Which vector index backs `vlmkit index build` / `POST /v1/search`: faiss vs usearch vs NumPy, measured.

Random unit vectors (N images, D dims, float32) and Q unit queries; top-k by inner product (= cosine).
Contenders: NumPy brute force (`argpartition` of one matmul: the peer and the reference), vlmkit's `ImageIndex`
(faiss `IndexFlatIP`, exact; one faiss thread for fewer than 16 queries), usearch `Index(metric="ip")` searched exactly (`exact=True`) and through its HNSW graph (approximate;
its build time counts the graph). Printed: build seconds, query milliseconds per query (batch of Q), and
recall@k against the brute force.

    PYTHONPATH=src python benchmarks/index_search.py                  # N 10k and 100k, D 512, 64 queries
    PYTHONPATH=src python benchmarks/index_search.py --queries 1      # one query at a time, as the server asks
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from vlmkit.runtime import describe_machine


def brute(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    s = q @ x.T  # (Q, N)
    top = np.argpartition(-s, k, axis=1)[:, :k]
    order = np.take_along_axis(s, top, 1).argsort(axis=1)[:, ::-1]
    return np.take_along_axis(top, order, 1)


def recall(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.mean([len(set(g) & set(w)) / len(w) for g, w in zip(got, want)]))


def timed(fn, reps: int = 3):
    best, out = float("inf"), None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def run(n: int, d: int, q: int, k: int) -> dict:
    from usearch.index import Index

    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    queries = rng.standard_normal((q, d)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    rows = {}
    t, want = timed(lambda: brute(x, queries, k))
    rows["numpy brute force"] = {"build_s": 0.0, "query_ms": 1000 * t / q, "recall": 1.0}

    from vlmkit.inference.index import ImageIndex

    tb, index = timed(lambda: ImageIndex(Path("."), [str(i) for i in range(n)], x, {}), 1)
    t, (_, ids) = timed(lambda: index.search(queries, k))
    rows["vlmkit (faiss IndexFlatIP)"] = {
        "build_s": tb,
        "query_ms": 1000 * t / q,
        "recall": recall(ids, want),
    }

    def usearch_build():
        index = Index(ndim=d, metric="ip", dtype="f32")
        index.add(np.arange(n), x)
        return index

    tb, uindex = timed(usearch_build, 1)
    t, m = timed(lambda: uindex.search(queries, k, exact=True))
    rows["usearch exact"] = {
        "build_s": tb,
        "query_ms": 1000 * t / q,
        "recall": recall(np.atleast_2d(m.keys), want),
    }
    t, m = timed(lambda: uindex.search(queries, k))
    rows["usearch HNSW"] = {
        "build_s": tb,
        "query_ms": 1000 * t / q,
        "recall": recall(np.atleast_2d(m.keys), want),
    }
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=64)
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--out")
    args = ap.parse_args()
    print(describe_machine())
    results = {}
    for n in map(int, args.sizes.split(",")):
        rows = run(n, args.dim, args.queries, args.k)
        results[n] = rows
        print(f"\nN={n} D={args.dim} Q={args.queries} k={args.k}")
        print(f"{'':27} {'build s':>8} {'ms/query':>9} {'recall':>7} {'vs numpy':>9}")
        base = rows["numpy brute force"]["query_ms"]
        for name, r in rows.items():
            print(f"{name:27} {r['build_s']:>8.2f} {r['query_ms']:>9.3f} {r['recall']:>7.3f} "
                  f"{base / r['query_ms']:>8.1f}x")  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()

"""Two gloo processes with DDP give the same loss and gradients as one process on the global batch.

Each rank runs a tiny model on its half of a fixed batch and writes its loss and DDP-averaged
gradients to a file; the parent compares them with a one-process run. A negative control with
a plain (no-gradient) all-gather shows that the comparison detects the classic bug.
"""

import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from vlmkit import distributed
from vlmkit.distributed import DistInfo
from vlmkit.losses import contrastive, create_loss, gather_features
from vlmkit.models import create_model

WORLD = 2
GLOBAL_BATCH = 8
TIMEOUT_S = 120
SHRINK = {
    "embed_dim": 64, "vision.width": 64, "vision.layers": 1, "vision.heads": 2, "vision.image_size": 32,
    "vision.patch_size": 8, "text.width": 64, "text.layers": 1, "text.heads": 2, "text.vocab_size": 100,
    "text.context_length": 16,
}  # fmt: skip
# (case name, model name, gather the loss uses)
CASES = [
    ("clip", "clip-tiny", "with_grad"),
    ("siglip", "siglip-tiny", "with_grad"),
    ("clip_plain", "clip-tiny", "plain"),
]


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    images = torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=g)  # (B, 3, 32, 32)
    tokens = torch.randint(3, 100, (GLOBAL_BATCH, 16), generator=g)  # (B, T)
    for row, length in enumerate(torch.randint(4, 16, (GLOBAL_BATCH,), generator=g).tolist()):
        tokens[row, length - 1] = 2  # end of text
        tokens[row, length:] = 0  # padding
    return images, tokens


def build_model(model_name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(model_name, **SHRINK)


def plain_gather(x: torch.Tensor) -> torch.Tensor:
    """The classic bug: all_gather without gradient, with only the local slice put back in the graph."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[dist.get_rank()] = x
    return torch.cat(parts)


def loss_and_grads(model: torch.nn.Module, loss_name: str, images, tokens) -> tuple[torch.Tensor, dict]:
    out = model(images, tokens)
    loss = create_loss(loss_name)(out.image_features, out.text_features, out.logit_scale, out.logit_bias)
    loss.backward()
    module = model.module if isinstance(model, DDP) else model
    return loss.detach(), {name: p.grad.clone() for name, p in module.named_parameters()}


def _worker(rank: int, port: int, out_dir: str, images: torch.Tensor, tokens: torch.Tensor) -> None:
    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        LOCAL_RANK=str(rank),
    )
    info = distributed.init_distributed("gloo")
    results = {
        "info": torch.tensor([info.rank, info.world_size, info.local_rank, int(distributed.is_main())])
    }
    try:
        local = slice(rank * GLOBAL_BATCH // WORLD, (rank + 1) * GLOBAL_BATCH // WORLD)
        for case, model_name, gather in CASES:
            model = DDP(build_model(model_name))
            if gather == "plain":
                contrastive.gather_features = plain_gather
            try:
                loss, grads = loss_and_grads(model, case.split("_")[0], images[local], tokens[local])
            finally:
                contrastive.gather_features = gather_features
            results[f"{case}/loss"] = loss
            results.update({f"{case}/grad/{name}": g for name, g in grads.items()})

        # gather_features alone: rank r weights the gathered rows with w_r, so d(loss_r)/dx_s = w_r[rows of s]
        # and the gradient reaching x_s must be the sum over r of those slices.
        x = torch.full((2, 3), float(rank), requires_grad=True)
        gathered = gather_features(x)
        weights = torch.arange(12.0).view(4, 3) * (rank + 1)
        (gathered * weights).sum().backward()
        results["gather/value"] = gathered.detach()
        results["gather/grad"] = x.grad

        results["all_reduce_mean"] = distributed.all_reduce_mean(torch.tensor([float(rank), 10.0 * rank]))
        results["broadcast"] = torch.tensor(distributed.broadcast_object({"value": 7 + rank})["value"])
        distributed.barrier()
    finally:
        distributed.cleanup()
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory) -> list[dict]:
    """Run both ranks once for every case; a hung collective fails the test instead of hanging it."""
    out_dir = tmp_path_factory.mktemp("ranks")
    images, tokens = global_batch()
    ctx = mp.start_processes(
        _worker,
        args=(free_port(), str(out_dir), images, tokens),
        nprocs=WORLD,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"distributed workers did not finish within {TIMEOUT_S} s")
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.fixture(scope="module")
def single_process() -> dict:
    images, tokens = global_batch()
    results = {}
    for case, model_name, _ in CASES:
        loss, grads = loss_and_grads(build_model(model_name), case.split("_")[0], images, tokens)
        results[f"{case}/loss"] = loss
        results.update({f"{case}/grad/{name}": g for name, g in grads.items()})
    return results


def grads_of(results: dict, case: str) -> dict[str, torch.Tensor]:
    prefix = f"{case}/grad/"
    return {k[len(prefix) :]: v for k, v in results.items() if k.startswith(prefix)}


@pytest.mark.parametrize("case", ["clip", "siglip"])
def test_two_ranks_match_one_process(rank_results, single_process, case):
    mean_loss = (rank_results[0][f"{case}/loss"] + rank_results[1][f"{case}/loss"]) / 2
    torch.testing.assert_close(mean_loss, single_process[f"{case}/loss"], rtol=1e-5, atol=1e-6)
    expected = grads_of(single_process, case)
    for rank in range(WORLD):
        got = grads_of(rank_results[rank], case)
        assert got.keys() == expected.keys()
        for name, grad in expected.items():
            assert grad.abs().max() > 0, f"{name} has no gradient; the comparison would be vacuous"
            torch.testing.assert_close(
                got[name], grad, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}"
            )


def test_plain_all_gather_is_detected(rank_results, single_process):
    # Negative control: the forward pass, hence the loss, is the same with the buggy gather ...
    mean_loss = (rank_results[0]["clip_plain/loss"] + rank_results[1]["clip_plain/loss"]) / 2
    torch.testing.assert_close(mean_loss, single_process["clip_plain/loss"], rtol=1e-5, atol=1e-6)
    # ... but the gradient other ranks' losses send to this rank's features is lost, so the
    # comparison that passes above must fail here.
    got, expected = grads_of(rank_results[0], "clip_plain"), grads_of(single_process, "clip_plain")
    mismatched = [n for n in expected if not torch.allclose(got[n], expected[n], rtol=1e-5, atol=1e-5)]
    assert len(mismatched) > len(expected) // 2, f"only {mismatched} differ"
    worst = max((got[n] - expected[n]).abs().max() / expected[n].abs().max() for n in expected)
    assert worst > 0.05


def test_gather_features_values_and_gradients(rank_results):
    for rank, results in enumerate(rank_results):
        expected_value = torch.cat([torch.zeros(2, 3), torch.ones(2, 3)])  # rank order
        torch.testing.assert_close(results["gather/value"], expected_value)
        weights = torch.arange(12.0).view(4, 3)
        rows = slice(2 * rank, 2 * rank + 2)
        expected_grad = weights[rows] * 1 + weights[rows] * 2  # sum over ranks r of w_r[rows of this rank]
        torch.testing.assert_close(results["gather/grad"], expected_grad)


def test_distributed_helpers_across_ranks(rank_results):
    for rank, results in enumerate(rank_results):
        assert results["info"].tolist() == [rank, WORLD, rank, int(rank == 0)]
        torch.testing.assert_close(results["all_reduce_mean"], torch.tensor([0.5, 5.0]))
        assert results["broadcast"].item() == 7  # rank 0's object


def test_helpers_are_noops_in_one_process(monkeypatch):
    for name in distributed.TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)
    info = distributed.init_distributed()
    assert info == DistInfo(0, 1, 0, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    assert info.is_main and distributed.is_main()
    t = torch.tensor([1.0, 2.0])
    assert distributed.all_reduce_mean(t) is t
    obj = {"a": 1}
    assert distributed.broadcast_object(obj) is obj
    distributed.barrier()
    distributed.cleanup()
    assert not dist.is_initialized()


def test_bad_torchrun_environment_raises(monkeypatch):
    from vlmkit.errors import ConfigError

    monkeypatch.setenv("RANK", "zero")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ConfigError, match="RANK='zero'"):
        distributed.init_distributed()

"""Precision by capability, threads, and the busy-machine check (vlmkit.runtime)."""

import logging

import pytest
import torch

from vlmkit import runtime
from vlmkit.errors import ConfigError
from vlmkit.runtime import CPUInfo, SpeedCheck, resolve_precision

ZEN2 = CPUInfo("AMD EPYC 7B12", frozenset({"avx2", "fma", "sse4_2"}), 2, 2)
ZEN4 = CPUInfo("AMD EPYC 9B14", frozenset({"avx2", "avx512f", "avx512_bf16"}), 2, 2)
SAPPHIRE = CPUInfo("Intel Xeon Platinum 8481C", frozenset({"avx512f", "amx_tile", "amx_bf16"}), 4, 8)
GRAVITON3 = CPUInfo("Neoverse-V1", frozenset({"asimd", "sve", "bf16"}), 2, 2)
UNKNOWN = CPUInfo("some CPU", frozenset(), 2, 2)


@pytest.fixture(autouse=True)
def _fresh_messages():
    runtime._said.clear()
    yield
    runtime._said.clear()


def speeds(bf16, fp32):
    return lambda: (bf16, fp32)


@pytest.mark.parametrize(
    "cpu, bf16, fp32, expected",
    [
        (ZEN2, 1.0, 116.0, "fp32"),  # emulated bf16: 100x slower
        (ZEN4, 390.0, 120.0, "bf16"),  # avx512_bf16
        (SAPPHIRE, 900.0, 200.0, "bf16"),  # AMX
        (GRAVITON3, 150.0, 80.0, "bf16"),  # Arm BF16
        (UNKNOWN, 300.0, 100.0, "bf16"),  # no flags known, but measured faster
        (UNKNOWN, 90.0, 100.0, "fp32"),  # no flags, not faster: the safe choice
        (ZEN4, 5.0, 120.0, "fp32"),  # flags say native, but this build emulates it: the measurement wins
    ],
)
def test_auto_precision_on_cpu(cpu, bf16, fp32, expected):
    p = resolve_precision("auto", "cpu", cpu=cpu, speeds=speeds(bf16, fp32))
    assert p.name == expected
    assert p.bf16 == (expected == "bf16")
    assert p.peak_gflops == (bf16 if expected == "bf16" else fp32)
    assert f"{fp32:.0f}" in p.reason and f"{bf16:.0f}" in p.reason


def test_auto_logs_choice_and_reason_once(caplog):
    with caplog.at_level(logging.INFO, logger="vlmkit.runtime"):
        for _ in range(3):
            resolve_precision("auto", "cpu", cpu=ZEN2, speeds=speeds(1.0, 116.0))
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["precision fp32: this CPU has no native bfloat16 (bf16 matmul 1 GFLOP/s, fp32 116)"]


def test_explicit_bf16_on_emulating_cpu_warns_once(caplog):
    with caplog.at_level(logging.INFO, logger="vlmkit.runtime"):
        for _ in range(2):
            p = resolve_precision("bf16", "cpu", cpu=ZEN2, speeds=speeds(1.0, 116.0))
    assert p.name == "bf16"  # asked for explicitly: honoured
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "116x slower" in warnings[0].getMessage()


def test_explicit_precisions_on_native_cpu_are_quiet(caplog):
    with caplog.at_level(logging.WARNING, logger="vlmkit.runtime"):
        assert resolve_precision("bf16", "cpu", cpu=ZEN4, speeds=speeds(390.0, 120.0)).name == "bf16"
        assert resolve_precision("fp32", "cpu", cpu=ZEN4, speeds=speeds(390.0, 120.0)).name == "fp32"
    assert not caplog.records


def test_cuda_decision_without_a_gpu():
    assert resolve_precision("auto", "cuda", cuda_bf16=lambda: True).name == "bf16"
    assert resolve_precision("auto", "cuda", cuda_bf16=lambda: False).name == "fp32"
    assert resolve_precision("fp32", "cuda", cuda_bf16=lambda: True).name == "fp32"


def test_unknown_precision_is_a_config_error():
    with pytest.raises(ConfigError, match="precision must be one of auto, bf16, fp32, not 'fp16'"):
        resolve_precision("fp16", "cpu")


def test_autocast_follows_the_choice():
    x = torch.randn(4, 4)
    bf = runtime.Precision("bf16", "auto", "")
    fp = runtime.Precision("fp32", "auto", "")
    with bf.autocast("cpu"):
        assert (x @ x).dtype == torch.bfloat16
    with fp.autocast("cpu"):
        assert (x @ x).dtype == torch.float32


def test_measured_speeds_are_real_numbers():
    bf16, fp32 = runtime.cpu_matmul_speeds()
    assert fp32 > 1.0 and bf16 > 0.01  # GFLOP/s: any CPU that runs the suite does this much
    assert runtime.cpu_matmul_speeds() == (bf16, fp32)  # measured once per process


def test_cpu_info_reads_this_machine():
    info = runtime.cpu_info()
    assert info.model and info.logical_cores >= info.physical_cores >= 1
    line = runtime.describe_machine("fp32")
    assert info.model in line and "precision fp32" in line


def test_configure_threads_uses_physical_cores(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
        monkeypatch.setattr(runtime, "cpu_info", lambda: CPUInfo("x", frozenset(), 1, 2))
        assert runtime.configure_threads() == 1 and torch.get_num_threads() == 1
        monkeypatch.setattr(runtime, "cpu_info", lambda: CPUInfo("x", frozenset(), 4, 8))
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two processes share the cores
        assert runtime.configure_threads() == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the user's (or torchrun's) choice wins
        torch.set_num_threads(1)
        assert runtime.configure_threads() == 1
    finally:
        torch.set_num_threads(before)


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def run_check(check, clock, step_s, cpu_per_step, steps=8, batch=128):
    message = None
    for step in range(1, steps + 1):
        clock.t += cpu_per_step
        message = check.update(step, step_s, batch) or message
    return message


def test_speed_check_quiet_on_an_idle_machine():
    clock = FakeClock()
    check = SpeedCheck(threads=2, flops_per_step=60e9, peak_gflops=120, cpu_time=clock)
    # 0.6 s steps against 1.0 s expected at 50% of peak; both threads busy all the time
    assert run_check(check, clock, step_s=0.6, cpu_per_step=1.2) is None
    assert check.done and check.verdict is None


def test_speed_check_flags_a_shared_cpu_once_with_figures():
    clock = FakeClock()
    check = SpeedCheck(threads=2, flops_per_step=60e9, peak_gflops=120, cpu_time=clock)
    # 20 s steps, and the process got 1 core-second per step out of 2 x 20
    message = run_check(check, clock, step_s=20.0, cpu_per_step=1.0)
    assert message is not None and "busy" in message
    assert "6.4 samples/s" in message and "about 128 expected" in message and "2% of the CPU time" in message
    assert check.update(9, 20.0, 128) is None  # said once


def test_speed_check_cpu_share_alone_suffices_for_small_models():
    clock = FakeClock()
    check = SpeedCheck(threads=2, flops_per_step=1e6, peak_gflops=120, cpu_time=clock)  # a tiny model
    assert (
        run_check(check, clock, step_s=0.5, cpu_per_step=1.0) is None
    )  # full share: overheads, not contention
    clock2 = FakeClock()
    check2 = SpeedCheck(threads=2, flops_per_step=1e6, peak_gflops=120, cpu_time=clock2)
    assert run_check(check2, clock2, step_s=0.5, cpu_per_step=0.3) is not None  # 30% share


def test_speed_check_expects_less_cpu_with_dataloader_workers():
    clock = FakeClock()
    check = SpeedCheck(threads=2, workers=2, flops_per_step=1e6, peak_gflops=120, cpu_time=clock)
    # 40% of two threads' time: what two workers on the same two cores leave this process, not contention
    assert run_check(check, clock, step_s=0.5, cpu_per_step=0.4) is None


def test_measuring_leaves_the_global_rng_alone():
    # a seeded run must initialise the same whether or not this process has measured its matmuls yet
    runtime._matmul_gflops.cache_clear()
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    runtime.cpu_matmul_speeds()
    assert torch.equal(torch.rand(3), expected)

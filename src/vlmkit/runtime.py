"""What the machine can do, and the choices that follow from it: precision, threads, a busy-machine check.

Nothing assumes the machine. bfloat16 is fast only where the hardware has it: on CPUs with AVX512-BF16 or
AMX (x86) or the BF16 extension (Arm) a bf16 matmul runs about 3x fp32; elsewhere PyTorch emulates it and it
runs 100-400x *slower* than fp32. So `precision="auto"` (the default everywhere) picks bf16 autocast only
where it is fast on that device, and says why once:

    precision fp32: this CPU has no native bfloat16 (bf16 matmul 1 GFLOP/s, fp32 116)

    prec = resolve_precision("auto", torch.device("cpu"))
    with prec.autocast(device):
        ...
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vlmkit.errors import ConfigError

log = logging.getLogger("vlmkit.runtime")

PRECISIONS = ("auto", "bf16", "fp32")
# CPU feature flags (Linux /proc/cpuinfo names) that mean bfloat16 matmuls run in hardware.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # the last is Arm's (ARMv8.6 FEAT_BF16)
# The vector flags worth printing beside a benchmark figure.
VECTOR_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "asimd",
    "sve",
    "sve2",
    "bf16",
    "i8mm",
)


@dataclass(frozen=True)
class CPUInfo:
    model: str
    flags: frozenset[str] = field(default_factory=frozenset)
    physical_cores: int = 1
    logical_cores: int = 1

    @property
    def native_bf16(self) -> list[str]:
        """The flags that say bfloat16 runs in hardware (empty: emulated, or unknown)."""
        return [f for f in NATIVE_BF16_FLAGS if f in self.flags]

    @property
    def vector_flags(self) -> list[str]:
        return [f for f in VECTOR_FLAGS if f in self.flags]

    def describe(self) -> str:
        """One line for logs and benchmark headers: model, cores and vector flags."""
        flags = " ".join(self.vector_flags) or "no AVX2/AVX-512/NEON flags found"
        return f"{self.model}, {self.physical_cores} physical cores ({self.logical_cores} logical); {flags}"


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _usable_cpus() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return set(range(os.cpu_count() or 1))


def _physical_cores(cpus: set[int]) -> int:
    """Distinct (package, core) pairs among the CPUs this process may use; hyperthreads count once."""
    cores = set()
    for cpu in cpus:
        topo = f"/sys/devices/system/cpu/cpu{cpu}/topology/"
        core, package = _read(topo + "core_id").strip(), _read(topo + "physical_package_id").strip()
        if not core:
            return len(cpus)  # no topology to read: assume no hyperthreads
        cores.add((package, core))
    return max(1, len(cores))


@functools.lru_cache(maxsize=1)
def cpu_info() -> CPUInfo:
    """This machine's CPU: model name, feature flags, physical and logical cores usable by this process."""
    text = _read("/proc/cpuinfo")
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model", "hardware") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:  # x86 "flags", Arm "Features"
            flags = set(value.split())
    if not model:
        model = platform.processor() or platform.machine() or "unknown CPU"
    cpus = _usable_cpus()
    return CPUInfo(model, frozenset(flags), _physical_cores(cpus), len(cpus))


def _best_seconds(fn: Callable[[], object], reps: int, warmup_s: float = 0.03) -> float:
    # warm-up (kernel selection, JIT, caches, threads waking, clocks ramping): at least one call and 30 ms
    t0 = time.perf_counter()
    fn()
    while time.perf_counter() - t0 < warmup_s:
        fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


@functools.lru_cache(maxsize=8)
def _matmul_gflops(dtype: torch.dtype, device_type: str, size: int, threads: int) -> float:
    device = torch.device(device_type)
    # Own generator: measuring must not move the global RNG, or a seeded run would initialise differently
    # depending on whether the process had measured before.
    g = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=g).to(device, dtype)
    b = torch.randn(size, size, generator=g).to(device, dtype)

    def run():
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()

    return 2 * size**3 / _best_seconds(run, reps=5) / 1e9


def matmul_gflops(dtype: torch.dtype, device: torch.device | str = "cpu", size: int = 512) -> float:
    """Measured speed of one square matmul of `dtype` on `device` (best of 5), GFLOP/s; cached per process."""
    return _matmul_gflops(dtype, torch.device(device).type, size, torch.get_num_threads())


def cpu_matmul_speeds() -> tuple[float, float]:
    """(bf16, fp32) matmul GFLOP/s on this CPU. An emulated bf16 matmul is measured small (256^3, tens of
    milliseconds at ~1 GFLOP/s), and again at 512^3 only if it turns out fast."""
    fp32 = matmul_gflops(torch.float32, "cpu", 512)
    bf16 = matmul_gflops(torch.bfloat16, "cpu", 256)
    if bf16 > 0.25 * fp32:
        bf16 = matmul_gflops(torch.bfloat16, "cpu", 512)
    return bf16, fp32


@dataclass(frozen=True)
class Precision:
    """The precision a run uses (`name` "bf16" or "fp32"), what was asked for, and why."""

    name: str
    requested: str
    reason: str
    peak_gflops: float | None = None  # measured matmul speed in this precision, when known

    @property
    def bf16(self) -> bool:
        return self.name == "bf16"

    def autocast(self, device: torch.device | str) -> contextlib.AbstractContextManager:
        """bfloat16 autocast (fp32 weights) for bf16; a no-op for fp32."""
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=self.bf16)

    def to_dict(self) -> dict:
        return {"name": self.name, "requested": self.requested, "reason": self.reason}


_said: set[str] = set()


def _once(level: int, message: str) -> None:
    if message not in _said:
        _said.add(message)
        log.log(level, message)


def check_precision(name: str, where: str = "precision") -> str:
    if name not in PRECISIONS:
        raise ConfigError(f"{where} must be one of {', '.join(PRECISIONS)}, not {name!r}")
    return name


def resolve_precision(
    requested: str = "auto",
    device: torch.device | str = "cpu",
    *,
    cpu: CPUInfo | None = None,
    speeds: Callable[[], tuple[float, float]] | None = None,
    cuda_bf16: Callable[[], bool] | None = None,
) -> Precision:
    """The precision to run in on `device`: "fp32" and "bf16" as asked (bf16 where it is emulated warns
    once); "auto" is bf16 autocast only where bf16 is fast: CUDA with bf16 support, or a CPU whose flags
    say native bf16 or whose measured bf16 matmul beats fp32. The choice and its reason are logged once.

    `cpu`, `speeds` (() -> (bf16, fp32) GFLOP/s) and `cuda_bf16` replace the machine's own, for tests.
    """
    check_precision(requested)
    device = torch.device(device)
    if device.type == "cuda":
        ok = (cuda_bf16 or torch.cuda.is_bf16_supported)()
        reason = "this GPU supports bfloat16" if ok else "this GPU has no bfloat16 support"
        if requested == "fp32":
            return Precision("fp32", requested, "fp32 asked for")
        if requested == "bf16" and not ok:
            _once(logging.WARNING, f"precision bf16 asked for, but {reason}; expect it to be slow or fail")
        name = "bf16" if requested == "bf16" or ok else "fp32"
        if requested == "auto":
            _once(logging.INFO, f"precision {name}: {reason}")
        return Precision(name, requested, reason)
    if device.type != "cpu":  # mps and others: fp32 unless asked
        name = "bf16" if requested == "bf16" else "fp32"
        return Precision(name, requested, f"{name} on {device.type}")

    cpu = cpu or cpu_info()
    bf16_speed, fp32_speed = (speeds or cpu_matmul_speeds)()
    figures = f"bf16 matmul {bf16_speed:.0f} GFLOP/s, fp32 {fp32_speed:.0f}"
    native = cpu.native_bf16
    if native:
        # Flags say native; a measurement far below fp32 (a build without the kernels) overrules them.
        fast = bf16_speed >= 0.5 * fp32_speed
        reason = (
            f"this CPU has native bfloat16 ({', '.join(native)}; {figures})"
            if fast
            else f"this CPU reports {', '.join(native)} but bf16 measured slow here ({figures})"
        )
    else:
        fast = bf16_speed > 1.1 * fp32_speed
        reason = (
            f"bf16 measured faster than fp32 on this CPU ({figures})"
            if fast
            else f"this CPU has no native bfloat16 ({figures})"
        )
    if requested == "auto":
        name = "bf16" if fast else "fp32"
        _once(logging.INFO, f"precision {name}: {reason}")
    else:
        name = requested
        if name == "fp32" or fast:
            _once(logging.INFO, f"precision {name}, as asked ({reason})")
        else:
            slower = fp32_speed / max(bf16_speed, 1e-9)
            _once(
                logging.WARNING,
                f"precision bf16 asked for, but {reason}: matmuls will run about {slower:.0f}x slower than in "
                "fp32; use precision auto or fp32 (--set precision=auto)",
            )
    peak = bf16_speed if name == "bf16" else fp32_speed
    return Precision(name, requested, reason, peak_gflops=peak)


def configure_threads() -> int:
    """Intra-op threads = the physical cores this process may use (hyperthreads only add contention to
    matmuls), unless OMP_NUM_THREADS says otherwise (torchrun sets it per process). Returns the count."""
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    cores = cpu_info().physical_cores
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)  # processes sharing this machine
    threads = max(1, cores // max(1, local))
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def describe_machine(precision: str | None = None) -> str:
    """One line for benchmark headers and CI: CPU model, cores, vector flags, torch threads [and precision]."""
    line = f"CPU: {cpu_info().describe()}; torch {torch.__version__}, {torch.get_num_threads()} threads"
    return f"{line}; precision {precision}" if precision else line


@dataclass
class SpeedCheck:
    """Notices, once, a training run far slower than this machine should be: another process competing
    for the cores. Feed it every step's wall time; it judges the steps after the first `warmup_steps`
    (allocations; compiling, whose worker processes leave this one idle) once it has `min_steps` of them
    and `min_seconds` of wall time.

    Two signs, either enough: this process got under `min_cpu_share` of its threads' CPU time (the cores
    are shared), or the steps ran at under `min_speed_ratio` of the speed that the step's counted FLOPs and
    the measured matmul peak predict (judged only for steps that should take at least 50 ms, where a
    small model's overheads do not dominate). Expected speed assumes `efficiency` of the peak.
    """

    threads: int
    flops_per_step: float | None = None  # forward + backward, counted (e.g. by FlopCounterMode)
    workers: int = 0  # DataLoader worker processes: they share the cores with this process by design
    warmup_steps: int = 1
    peak_gflops: float | None = None
    min_steps: int = 4
    min_seconds: float = 2.0
    min_cpu_share: float = 0.6
    min_speed_ratio: float = 0.25
    efficiency: float = 0.5
    cpu_time: Callable[[], float] | None = None  # this process's CPU seconds; None = time.process_time
    verdict: str | None = None  # the message, once judged slow
    done: bool = False
    _walls: list[float] = field(default_factory=list)
    _cpu0: float | None = None

    def expected_step_s(self) -> float | None:
        if not self.flops_per_step or not self.peak_gflops:
            return None
        return self.flops_per_step / (self.peak_gflops * 1e9 * self.efficiency)

    def update(self, step: int, wall_s: float, samples_per_step: int) -> str | None:
        """Record one step; returns the warning message the one time the machine is judged busy."""
        if self.done:
            return None
        clock = self.cpu_time or time.process_time
        if step <= self.warmup_steps:
            self._cpu0 = clock()
            return None
        self._walls.append(wall_s)
        if len(self._walls) < self.min_steps or sum(self._walls) < self.min_seconds:
            return None
        self.done = True
        wall = sum(self._walls)
        cpu_share = (clock() - self._cpu0) / (wall * self.threads) if self._cpu0 is not None else 1.0
        step_s = wall / len(self._walls)
        expected = self.expected_step_s()
        slow = expected is not None and expected >= 0.05 and expected / step_s < self.min_speed_ratio
        # each worker process may take its share of the cores: expect proportionally less for this one
        min_share = self.min_cpu_share * self.threads / (self.threads + self.workers)
        if cpu_share >= min_share and not slow:
            return None
        have = f"{samples_per_step / step_s:.1f} samples/s"
        if expected is not None:
            have += (
                f" against about {samples_per_step / expected:.0f} expected on this machine "
                f"(matmul {self.peak_gflops:.0f} GFLOP/s)"
            )
        self.verdict = (
            f"this machine looks busy: {have}; this process got {cpu_share:.0%} of the CPU time of its "
            f"{self.threads} threads. Another process is probably using the cores: runs with a time budget "
            "will train far fewer steps. Stop the other process, or run with OMP_NUM_THREADS set to the free cores."
        )
        return self.verdict

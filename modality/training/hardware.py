"""What the CPU can do, and the precision and thread count a run uses because of it.

Why: bf16 autocast on a CPU pays only where the CPU computes bf16 natively (AVX512-BF16 or AMX on x86, the
BF16 extension on Arm). Elsewhere PyTorch emulates it: resnet18 at 64 px, 1 thread, on an AVX2-only AMD EPYC
trained at 66 img/s in fp32 and 4.4 img/s in bf16 (15x slower); on an AVX-512 Xeon with AMX bf16 is 2.5-3x
faster (../shared/reference/measured-facts.md). ``torch.backends.cpu.get_cpu_capability()`` says "AVX512",
"AVX2" or "DEFAULT" but not whether bf16 is native, so the flags the kernel reports in ``/proc/cpuinfo``
decide. Where there is no ``/proc/cpuinfo`` (macOS, Windows) a short timed matmul probe decides instead.

Threads: on a machine with at most two usable cores a run trains with one torch thread. OpenMP threads
spin-wait for each other; when another process holds one of the two cores, two threads trained at 16 img/s
against 66 img/s for one (measured-facts.md). DDP ranks get Lightning's own split (cores / ranks).
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

CPUINFO_PATH = Path("/proc/cpuinfo")
#: x86 flags (Linux names) of native bf16 arithmetic: AVX512-BF16 dot products, AMX tiles with bf16.
X86_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
#: Arm ("Features" line): the BF16 extension (Neoverse V1/V2, Graviton 3/4).
ARM_BF16_FLAGS = ("bf16",)
#: Set by the first process that ran the probe, so DDP ranks Lightning starts later reuse its answer
#: (a timed probe may answer differently in two processes; every rank must train alike).
PROBE_ENV = "MODALITY_CPU_BF16_PROBE"
SMALL_MACHINE_CORES = 2


def read_cpuinfo() -> str | None:
    """The text of ``/proc/cpuinfo``, or None where there is none (not Linux) or it cannot be read."""
    try:
        return CPUINFO_PATH.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def parse_cpuinfo(text: str) -> tuple[str | None, set[str]]:
    """(model name, flags) of the first processor listed: x86 ``flags`` or Arm ``Features``."""
    model, flags = None, set()
    for line in text.splitlines():
        if not line.strip():
            if model is not None or flags:
                break  # end of the first processor's block
            continue
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key == "model name" and model is None:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return model, flags


@dataclass
class CpuDescription:
    """The CPU as a run summary records it."""

    model: str
    torch_capability: str
    bf16_flags: list[str]  # the native-bf16 flags found; empty when none (or flags unknown)
    flags_known: bool  # False where /proc/cpuinfo could not be read
    usable_cores: int
    probe_bf16_over_fp32: float | None = None  # matmul time ratio, only where the flags were unknown
    extra: dict[str, Any] = field(default_factory=dict)


def usable_cores() -> int:
    """Cores this process may run on (CPU affinity, e.g. a container's cpuset), not the host's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def describe_cpu() -> CpuDescription:
    text = read_cpuinfo()
    model, flags = parse_cpuinfo(text) if text is not None else (None, set())
    return CpuDescription(
        model=model or platform.processor() or platform.machine() or "unknown",
        torch_capability=str(torch.backends.cpu.get_cpu_capability()),
        bf16_flags=sorted(flag for flag in (*X86_BF16_FLAGS, *ARM_BF16_FLAGS) if flag in flags),
        flags_known=text is not None and bool(flags),
        usable_cores=usable_cores(),
    )


def bf16_matmul_probe(size: int = 256, repeats: int = 8) -> float:
    """Time of a bf16 matmul over that of an fp32 one, same shape, on this thread count (about 0.1 s).

    Native bf16 runs it in well under the fp32 time (AMX: ~0.1x); emulated bf16 takes several times longer.
    """
    if os.environ.get(PROBE_ENV):
        return float(os.environ[PROBE_ENV])
    generator = torch.Generator().manual_seed(0)
    a32 = torch.randn(size, size, generator=generator)
    b32 = torch.randn(size, size, generator=generator)
    timings = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = a32.to(dtype), b32.to(dtype)
        torch.matmul(a, b)  # warm-up: kernel selection, first-touch
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            torch.matmul(a, b)
            best = min(best, time.perf_counter() - started)
        timings[dtype] = best
    ratio = timings[torch.bfloat16] / max(timings[torch.float32], 1e-9)
    os.environ[PROBE_ENV] = f"{ratio:.4f}"
    return ratio


def choose_cpu_precision(cpu: CpuDescription) -> tuple[str, str]:
    """``(precision, reason)`` for training on this CPU: bf16-mixed only where bf16 is native.

    x86 bf16 flags count only while torch runs its AVX-512 kernels: capped lower (``ATEN_CPU_CAPABILITY``,
    ``ONEDNN_MAX_CPU_ISA=AVX2``) the same Xeon with AMX trained resnet18 7x slower in bf16 than in fp32, so
    the probe decides then.
    """
    x86_flags = [flag for flag in cpu.bf16_flags if flag in X86_BF16_FLAGS]
    capped = bool(x86_flags) and not cpu.torch_capability.upper().startswith("AVX512")
    if cpu.bf16_flags and not capped:
        return "bf16-mixed", f"native bf16 on this CPU ({', '.join(cpu.bf16_flags)} in /proc/cpuinfo)"
    if cpu.flags_known and not capped:
        return "32-true", (
            f"no native bf16 (none of {', '.join(X86_BF16_FLAGS + ARM_BF16_FLAGS)} in /proc/cpuinfo; "
            f"torch capability {cpu.torch_capability}): bf16 would be emulated, many times slower than fp32"
        )
    why = (
        f"{', '.join(x86_flags)} in /proc/cpuinfo but torch runs at {cpu.torch_capability}"
        if capped
        else "CPU flags unknown"
    )
    ratio = cpu.probe_bf16_over_fp32
    if ratio is None:
        ratio = cpu.probe_bf16_over_fp32 = bf16_matmul_probe()
    if ratio < 1.0:
        return "bf16-mixed", f"{why}; probe: a bf16 matmul took {ratio:.2f}x the fp32 time"
    return "32-true", f"{why}; probe: a bf16 matmul took {ratio:.2f}x the fp32 time (emulated)"


def choose_gpu_precision() -> tuple[str, str]:
    if torch.cuda.is_bf16_supported():
        return "bf16-mixed", "GPU with bf16"
    return "16-mixed", "GPU without bf16"


def choose_cpu_threads(setting: Any, processes: int, cores: int | None = None) -> tuple[int | None, str]:
    """``(threads, reason)`` for ``cpu_threads`` (``auto`` or a number); None leaves torch's setting alone.

    ``auto``: ``OMP_NUM_THREADS`` when set wins (it is the user's choice, and torch already read it); with
    several processes (CPU DDP) Lightning gives each cores / processes threads; a single process on a
    machine with at most two usable cores uses one thread (see the module docstring); otherwise torch's
    default (one per physical core).
    """
    cores = usable_cores() if cores is None else cores
    if setting not in (None, "auto"):
        threads = int(setting)
        if threads < 1:
            raise ValueError(f"cpu_threads must be auto or >= 1, got {setting!r}")
        return threads, "cpu_threads set in the config"
    if os.environ.get("OMP_NUM_THREADS"):
        return None, f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} from the environment"
    if processes > 1:
        return None, f"{processes} processes: Lightning gives each {max(1, cores // processes)} thread(s)"
    if cores <= SMALL_MACHINE_CORES:
        return 1, (
            f"{cores} usable cores: one thread (two spin-wait for each other when another process "
            "holds a core: 16 vs 66 img/s measured)"
        )
    return None, f"{cores} usable cores: torch's default"


def cpu_banner() -> str:
    """One line for benchmark output: where the figures were measured."""
    cpu = describe_cpu()
    flags = ", ".join(cpu.bf16_flags) if cpu.bf16_flags else ("none" if cpu.flags_known else "unknown")
    return (
        f"CPU: {cpu.model}; torch capability {cpu.torch_capability}; native bf16 flags: {flags}; "
        f"{cpu.usable_cores} usable cores, {torch.get_num_threads()} torch threads; torch {torch.__version__}"
    )


def as_record(cpu: CpuDescription) -> dict[str, Any]:
    record = asdict(cpu)
    record.pop("extra")
    return record | cpu.extra

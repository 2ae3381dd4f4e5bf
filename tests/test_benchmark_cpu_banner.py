"""Every benchmark script says which CPU its figures come from (one helper: ``hardware.cpu_banner``)."""

from __future__ import annotations

import ast
import subprocess
import sys

import torch

from modality.paths import PROJECT_ROOT
from modality.training import hardware

BENCHMARKS = PROJECT_ROOT / "benchmarks"
HELPERS = {"bench_shards.py"}  # builds benchmark data; measures nothing itself


def test_banner_names_the_cpu_its_capability_and_bf16_flags(monkeypatch) -> None:
    cpuinfo = "processor\t: 0\nmodel name\t: AMD EPYC 7B12\nflags\t\t: fpu avx2 fma\n"
    monkeypatch.setattr(hardware, "read_cpuinfo", lambda: cpuinfo)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    banner = hardware.cpu_banner()
    assert banner.startswith("CPU: AMD EPYC 7B12; torch capability AVX2; native bf16 flags: none;")


def test_every_benchmark_main_prints_the_banner() -> None:
    scripts = sorted(path for path in BENCHMARKS.glob("*.py") if path.name not in HELPERS)
    assert len(scripts) >= 5
    for script in scripts:
        tree = ast.parse(script.read_text())
        (main,) = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "main"]
        calls = [
            node
            for node in ast.walk(main)
            if isinstance(node, ast.Call)
            and getattr(node.func, "id", None) == "print"
            and any(
                getattr(arg, "func", None) is not None and getattr(arg.func, "id", None) == "cpu_banner"
                for arg in node.args
            )
        ]
        assert calls, f"{script.name}: main() does not print cpu_banner()"


def test_a_benchmark_run_prints_this_machines_cpu() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "audit_near_duplicates.py"), "--samples", "500", "--planted", "5"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    cpu = hardware.describe_cpu()
    first = done.stdout.splitlines()[0]
    assert first.startswith(f"CPU: {cpu.model}; torch capability {cpu.torch_capability};"), first

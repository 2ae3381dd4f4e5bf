"""Forward-pass timing for ``metrics.json``: measured around the model's forward only (inputs already
normalised on the device, warm-up excluded, ``torch.cuda.synchronize`` before and after on GPU), at each
configured batch size, with the hardware it ran on written beside the figures."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch


def hardware_description(device: torch.device) -> dict[str, Any]:
    """Where the timing was measured: CPU model, threads, GPU name, library versions."""
    cpu_model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "device": str(device),
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        # Other processes on the machine slow a CPU measurement many-fold: keep the evidence beside it.
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    return info


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_forward(
    model: torch.nn.Module,
    example: torch.Tensor,
    batch_sizes: Sequence[int],
    warmup: int = 2,
    repeats: int = 10,
    max_seconds: float = 30.0,
) -> dict[str, Any]:
    """ms/image and images/s per batch size around ``model(x)`` only; ``example`` is one normalised input batch.

    The example is tiled to each batch size (content does not change a CNN's cost). Each size runs
    ``warmup`` untimed passes, then up to ``repeats`` timed ones (at least 3) within ``max_seconds``.
    """
    device = example.device
    results: dict[str, Any] = {}
    with torch.inference_mode():
        for size in batch_sizes:
            reps = int(np.ceil(size / example.shape[0]))
            inputs = example.repeat(reps, 1, 1, 1)[:size].contiguous()
            for _ in range(warmup):
                model(inputs)
            _synchronise(device)
            times: list[float] = []
            started = time.perf_counter()
            while len(times) < repeats and (len(times) < 3 or time.perf_counter() - started < max_seconds):
                _synchronise(device)
                t0 = time.perf_counter()
                model(inputs)
                _synchronise(device)
                times.append(time.perf_counter() - t0)
            median = statistics.median(times)
            results[str(size)] = {
                "batch_size": size,
                "repeats": len(times),
                "median_batch_ms": median * 1000,
                "ms_per_image": median * 1000 / size,
                "images_per_s": size / median,
            }
    return results

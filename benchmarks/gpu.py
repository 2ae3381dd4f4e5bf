"""GPU training throughput: resnet18 and vgg16 at 224 px, bf16 autocast, channels_last, 1 GPU and 2 if present.

Measures, per network:

* ``synthetic``: training steps on a batch that already lives on the GPU (the model's ceiling);
* ``loader``: the ModalityDataModule alone, batches moved to the GPU and normalised there (``--data-dir``
  with prepare's output, or benchmark shards built from the real corpus when omitted);
* ``loader+train``: the same loader feeding the training step (what a real run gets);
* ``ddp x2``: the synthetic step under DistributedDataParallel on two GPUs (NCCL), when two are present.

Target (issue 3): resnet18 >= 3000 img/s on one H100.

``--dry-run`` runs every path on the CPU at toy sizes (32 px, batch 8, DDP over gloo with two processes)
so the script is known to work before GPU time is spent. On a GPU machine:

    python benchmarks/gpu.py                      # 1 GPU (and 2 if present), synthetic + real loader
    python benchmarks/gpu.py --data-dir data/demo/prepared --workers 8
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from modality.models.networks import create_network
from modality.training.hardware import cpu_banner

NUM_CLASSES = 4


def autocast(device: torch.device, enabled: bool) -> AbstractContextManager:
    if not enabled:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def build_step(
    network_name: str,
    device: torch.device,
    channels_last: bool,
    bf16: bool,
    compile_model: bool,
    ddp: bool = False,
) -> tuple[torch.nn.Module, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """A network and one SGD training step on it, configured like train.py's fast path."""
    torch.manual_seed(0)
    network = create_network(network_name, NUM_CLASSES).to(device)
    if channels_last:
        network = network.to(memory_format=torch.channels_last)
    model: torch.nn.Module = network
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(
            network, device_ids=[device.index] if device.type == "cuda" else None
        )
    forward = torch.compile(model) if compile_model else model
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1, momentum=0.9)

    def step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, bf16):
            loss = F.cross_entropy(forward(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    return model, step


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], object], device: torch.device, warmup: int, steps: int) -> float:
    """Seconds for ``steps`` calls after ``warmup`` calls, with the device drained on both ends."""
    for _ in range(warmup):
        step()
    synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return time.perf_counter() - started


def synthetic(args: argparse.Namespace, network_name: str, device: torch.device) -> float:
    _, step = build_step(network_name, device, args.channels_last, args.bf16, args.compile)
    images = torch.randn(args.batch_size, 1, args.image_size, args.image_size, device=device)
    labels = torch.randint(0, NUM_CLASSES, (args.batch_size,), device=device)
    seconds = time_steps(lambda: step(images, labels), device, args.warmup, args.steps)
    return args.batch_size * args.steps / seconds


def _ddp_worker(rank: int, world: int, args: argparse.Namespace, network_name: str, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    use_cuda = torch.cuda.is_available() and not args.dry_run
    dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world)
    try:
        device = torch.device("cuda", rank) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(device)
        _, step = build_step(network_name, device, args.channels_last, args.bf16, args.compile, ddp=True)
        images = torch.randn(args.batch_size, 1, args.image_size, args.image_size, device=device)
        labels = torch.randint(0, NUM_CLASSES, (args.batch_size,), device=device)
        dist.barrier()
        seconds = time_steps(lambda: step(images, labels), device, args.warmup, args.steps)
        elapsed = torch.tensor([seconds], device=device)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
        if rank == 0:
            queue.put(world * args.batch_size * args.steps / float(elapsed.item()))
    finally:
        dist.destroy_process_group()


def ddp_synthetic(args: argparse.Namespace, network_name: str, world: int) -> float:
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    port = 29500 + os.getpid() % 1000
    mp.start_processes(
        _ddp_worker, args=(world, args, network_name, port, queue), nprocs=world, start_method="spawn"
    )
    return float(queue.get())


def benchmark_data_dir(samples: int, image_size: int) -> Path:
    """Shards of real slices in prepare's format, built once (see benchmarks/loader.py)."""
    import loader

    root = Path(tempfile.gettempdir()) / f"modality-gpu-bench-{samples}"
    return loader.build_data(samples, root, layouts=("png",), png_files=False)["png"]


def real_loader(args: argparse.Namespace, network_name: str | None, device: torch.device) -> float:
    """Images/s of the DataModule's training loader, feeding a training step when ``network_name`` is set."""
    from modality.data.datamodule import ModalityDataModule

    module = ModalityDataModule(
        data_dir=str(args.data_dir),
        batch_size=args.batch_size,
        num_workers=args.workers,
        image_size=args.image_size,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        samples_per_epoch=args.batch_size * (args.warmup + args.steps),
        prepare_dataset=None,
    )
    module.setup("fit")
    step = (
        build_step(network_name, device, args.channels_last, args.bf16, args.compile)[1]
        if network_name
        else None
    )
    batches = iter(module.train_dataloader())

    def one() -> None:
        images, labels = next(batches)
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        images, labels = module.on_after_batch_transfer((images, labels), 0)
        if step is not None:
            step(images, labels)

    seconds = time_steps(one, device, args.warmup, args.steps)
    return args.batch_size * args.steps / seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", nargs="+", default=["resnet18", "vgg16"])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--data-dir", type=Path, default=None, help="prepare output for the real-loader rows")
    parser.add_argument("--no-loader", action="store_true", help="synthetic rows only")
    parser.add_argument("--no-ddp", action="store_true")
    parser.add_argument("--fp32", dest="bf16", action="store_false", help="disable bf16 autocast")
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    parser.add_argument("--compile", action="store_true", help="torch.compile the network")
    parser.add_argument("--dry-run", action="store_true", help="CPU, toy sizes: checks every path runs")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    print(cpu_banner())
    if args.dry_run:
        args.image_size, args.batch_size, args.warmup, args.steps, args.workers = 32, 8, 1, 2, 0
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        print("no CUDA device: use --dry-run to check the script on a CPU", file=sys.stderr)
        return 2
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    gpus = torch.cuda.device_count() if cuda else 0
    name = torch.cuda.get_device_name(0) if cuda else "CPU (dry run)"
    if not args.no_loader and args.data_dir is None:
        args.data_dir = benchmark_data_dir(
            max(2048, args.batch_size * (args.warmup + args.steps)), args.image_size
        )

    rows: list[dict[str, object]] = []

    def record(network: str, mode: str, devices: int, images_per_s: float) -> None:
        rows.append(
            {"network": network, "mode": mode, "devices": devices, "img_per_s": round(images_per_s, 1)}
        )
        print(f"{network:10s} {mode:14s} x{devices}: {images_per_s:10.1f} img/s", file=sys.stderr, flush=True)

    for network in args.networks:
        record(network, "synthetic", 1, synthetic(args, network, device))
        if not args.no_loader:
            record(network, "loader+train", 1, real_loader(args, network, device))
        if not args.no_ddp and (gpus >= 2 or args.dry_run):
            record(network, "ddp synthetic", 2, ddp_synthetic(args, network, 2))
    if not args.no_loader:
        record("-", "loader only", 1, real_loader(args, None, device))

    precision = "bf16 autocast" if args.bf16 else "fp32"
    layout = "channels_last" if args.channels_last else "contiguous"
    print(
        f"\n{name}, {gpus} GPU(s), {args.image_size} px, batch {args.batch_size}/device, {precision}, {layout}, "
        f"compile={args.compile}, {args.steps} steps after {args.warmup} warm-up, loader workers {args.workers}\n"
    )
    print("| network | mode | devices | img/s |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['network']} | {row['mode']} | {row['devices']} | {row['img_per_s']:,} |")
    if args.json:
        args.json.write_text(
            json.dumps({"device": name, "gpus": gpus, "args": vars(args), "rows": rows}, default=str)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

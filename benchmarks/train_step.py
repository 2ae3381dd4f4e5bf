"""Lightning's training overhead: ModalityClassifier under a Trainer against a plain PyTorch loop.

Both run the same network (resnet18 by default, one channel, 4 classes), the same initial weights, the
same optimiser (the project default, SGD lr 0.1 momentum 0.9), the same float batches built once in
memory from real slices (so no loader cost on either side), on the same number of threads. The Trainer
runs the module exactly as train.py configures it, minus checkpoint files: its per-step metric updates
(confusion matrix, mean loss), ``self.log`` and a CSV logger included. Timing starts after warm-up
steps on both sides; the two are interleaved over rounds and the median is reported, because other
processes on a shared machine move single measurements by more than the overhead we look for; images
per CPU second (process time) are printed too, since they are less disturbed by other processes.

Target (issue 3): Lightning images/s within 5% of the plain loop.

Run: ``python benchmarks/train_step.py`` (resnet18 at 64 px, batch 64, 10 warm-up + 30 timed steps, 3
rounds; about two minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import bench_shards
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from pytorch_lightning.loggers import CSVLogger
from torch.utils.data import DataLoader

from modality.models.classifier import ModalityClassifier
from modality.training.hardware import cpu_banner

CLASSES = list(bench_shards.CLASSES)


def make_batches(count: int, batch_size: int, image_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` float batches in [-1, 1] of real slices resized to ``image_size``."""
    images, labels = bench_shards.benchmark_images(count * batch_size)
    pixels = torch.from_numpy(images).unsqueeze(1).float().div_(127.5).sub_(1.0)
    if image_size != pixels.shape[-1]:
        pixels = F.interpolate(pixels, size=(image_size, image_size), mode="bilinear", antialias=True)
    targets = torch.from_numpy(labels)
    return [
        (
            pixels[i * batch_size : (i + 1) * batch_size].contiguous(),
            targets[i * batch_size : (i + 1) * batch_size],
        )
        for i in range(count)
    ]


def new_module(network: str, image_size: int, channels_last: bool) -> ModalityClassifier:
    torch.manual_seed(0)
    data_info = {"classes": CLASSES, "input_size": image_size, "normalize": "minus_one_one"}
    return ModalityClassifier(network=network, data_info=data_info, channels_last=channels_last)


def plain_loop(module: ModalityClassifier, batches, warmup: int) -> tuple[float, float]:
    """(images per wall second, per CPU second) of a hand-written loop: forward, loss, backward, step."""
    network = module.network
    network.train()
    optimizer = instantiate(module.hparams.optimizer)(params=network.parameters())
    started, cpu_started, timed_images = 0.0, 0.0, 0
    for step, (images, labels) in enumerate(batches):
        if step == warmup:
            started, cpu_started = time.perf_counter(), time.process_time()
        if module.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        loss = F.cross_entropy(network(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step >= warmup:
            timed_images += len(labels)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    return timed_images / wall, timed_images / cpu


class StepTimer(pl.Callback):
    """Wall and CPU time from the first timed batch's start to the last batch's end."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.images = warmup, 0
        self.started = self.ended = self.cpu_started = self.cpu_ended = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            self.started, self.cpu_started = time.perf_counter(), time.process_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx >= self.warmup:
            self.images += len(batch[1])
            self.ended, self.cpu_ended = time.perf_counter(), time.process_time()


def lightning_loop(module: ModalityClassifier, batches, warmup: int, log_dir: str) -> tuple[float, float]:
    """(images per wall second, per CPU second) of Trainer.fit on the same batches (no loading work)."""
    timer = StepTimer(warmup)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        limit_val_batches=0,
        logger=CSVLogger(log_dir, name="bench"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
        num_sanity_val_steps=0,
    )
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None, shuffle=False))
    return timer.images / (timer.ended - timer.started), timer.images / (timer.cpu_ended - timer.cpu_started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--network", default="resnet18")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--channels-last", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(cpu_banner())
    pl.seed_everything(0, verbose=False)
    batches = make_batches(args.warmup + args.steps, args.batch_size, args.image_size)
    plain: list[tuple[float, float]] = []
    lightning: list[tuple[float, float]] = []
    with tempfile.TemporaryDirectory() as log_dir:
        for round_index in range(args.rounds):
            plain.append(
                plain_loop(
                    new_module(args.network, args.image_size, args.channels_last), batches, args.warmup
                )
            )
            lightning.append(
                lightning_loop(
                    new_module(args.network, args.image_size, args.channels_last),
                    batches,
                    args.warmup,
                    log_dir,
                )
            )
            print(
                f"round {round_index}: plain {plain[-1][0]:.1f} img/s ({plain[-1][1]:.1f} per CPU s), "
                f"lightning {lightning[-1][0]:.1f} img/s ({lightning[-1][1]:.1f} per CPU s)",
                file=sys.stderr,
            )
    print(
        f"\n{args.network} at {args.image_size} px, batch {args.batch_size}, {args.steps} timed steps after "
        f"{args.warmup} warm-up, {args.threads} threads, median of {args.rounds} interleaved rounds\n"
    )
    print("| loop | img/s (median) | img per CPU second (median) | img/s by round |")
    print("|---|---|---|---|")
    medians = {}
    for name, values in (("plain PyTorch", plain), ("Lightning (ModalityClassifier)", lightning)):
        wall, cpu = statistics.median(v[0] for v in values), statistics.median(v[1] for v in values)
        medians[name] = (wall, cpu)
        print(f"| {name} | {wall:.1f} | {cpu:.1f} | {', '.join(f'{v[0]:.1f}' for v in values)} |")
    (plain_wall, plain_cpu), (light_wall, light_cpu) = medians.values()
    print(
        f"\nLightning / plain: {light_wall / plain_wall:.3f} in img/s (overhead {100 * (1 - light_wall / plain_wall):.1f}%), "
        f"{light_cpu / plain_cpu:.3f} per CPU second (overhead {100 * (1 - light_cpu / plain_cpu):.1f}%); target <= 5%"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

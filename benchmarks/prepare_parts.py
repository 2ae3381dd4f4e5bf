"""Partitioned prepare: one run vs 1 part + merge vs 2 parts side by side + merge, on uncompressed real DICOM.

Run: ``python benchmarks/prepare_parts.py [--repeats 3] [--files 0]``. The pool is every usable CT/MR/PT file of
the shared real corpus whose pixel data is stored plain (the IDC's common case: 99.5% of its CT/MR/PET series),
copied to a temporary folder (one dataset per repository, all in ``train``). Each configuration starts from an
empty ``out_dir`` and runs as separate processes (``python -m modality.prepare``), one worker each, in an
interleaved order per repeat so drift on a shared machine hits all alike. CPU seconds are the children's
user+sys (``resource.getrusage``), so they hold under load; wall seconds are what a user waits.

Printed: per-slice CPU of a part (read + decode + encode + cache) and of the merge (decisions + shard write),
the speed-up of two parts over one, the cost of parts + merge over one plain run, and a projection to the
reference study's 4.5 M slices and to all IDC CT/MR/PET, at N nodes, from the measured per-slice costs and
an assumed download rate (the arguments say which).
"""

from __future__ import annotations

import argparse
import csv
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pydicom.uid import UncompressedTransferSyntaxes

from modality.paths import shared_data_root
from modality.training.hardware import cpu_banner

#: Pixel data stored as plain integers, not deflated either (a changed byte would break a deflate stream).
NATIVE_SYNTAXES = frozenset(UncompressedTransferSyntaxes) - {"1.2.840.10008.1.2.1.99"}


def variant(source: Path, target: Path, copy: int) -> None:
    """``source`` with one byte near its end changed: in an uncompressed file that is a pixel of the last
    frame, so the copy is a distinct image to the identical-image guard with the same decode work (a file whose
    last element is not its pixel data stays a duplicate and is rejected as one, after being decoded)."""
    data = bytearray(source.read_bytes())
    if len(data) > 2:
        data[-2] ^= copy & 0xFF
    target.write_bytes(bytes(data))


def native_pool(root: Path, dest: Path, limit: int, copies: int = 1) -> tuple[Path, dict[str, str]]:
    """Copy the usable uncompressed CT/MR/PT DICOM files into ``dest/<repo>/`` (``copies`` variants of each);
    the split map."""
    split: dict[str, str] = {}
    count = 0
    with (root / "manifest.csv").open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            if not (row["kind"] == "dicom" and row["usable"] == "1" and row["class"] in ("CT", "MR", "PT")):
                continue
            if (
                row["transfer_syntax"] not in NATIVE_SYNTAXES
            ):  # the set benchmarks/prepare.py --syntax native uses
                continue
            dataset = row["source_repo"].replace("/", "_").replace("-", "_").lower()
            for copy in range(copies):
                # one folder per original file and its variants: a series-sized unit for the partition
                target = dest / dataset / f"{count:05d}" / f"{copy}.dcm"
                target.parent.mkdir(parents=True, exist_ok=True)
                if copy == 0:
                    shutil.copyfile(root / row["path"], target)
                else:
                    variant(root / row["path"], target, copy)
            split[dataset] = "train"
            count += 1
            if limit and count >= limit:
                break
    return dest, split


def write_config(conf: Path, data: Path, split: dict[str, str]) -> None:
    lines = ["name: native", "sources:"]
    for dataset in sorted(split):
        lines += [
            "  - _target_: modality.sources.folders.DicomFolderSource",
            f"    root: '{data / dataset}'",
            f"    dataset: {dataset}",
        ]
    lines += ["split:"] + [f"  {d}: train" for d in sorted(split)]
    (conf / "dataset").mkdir(parents=True, exist_ok=True)
    (conf / "dataset" / "native.yaml").write_text("\n".join(lines) + "\n", encoding="utf-8")


def command(conf: Path, out: Path, *overrides: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "modality.prepare",
        f"hydra.searchpath=[file://{conf}]",
        "dataset=native",
        f"out_dir={out}",
        "workers=1",
        "progress=false",
        "charts=false",
        *overrides,
    ]


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(commands: list[list[str]]) -> tuple[float, float]:
    """Run ``commands`` side by side; (wall seconds until all end, CPU seconds of all)."""
    cpu0, start = children_cpu(), time.perf_counter()
    procs = [
        subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for c in commands
    ]
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"{proc.args} failed:\n{err[-2000:]}")
    return time.perf_counter() - start, children_cpu() - cpu0


def slices_written(out: Path) -> int:
    import json

    return int(json.loads((out / "summary.json").read_text())["inputs"]["slices_written"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--files", type=int, default=0, help="at most this many files (0: all)")
    parser.add_argument("--copies", type=int, default=8, help="variants of each file (more slices per run)")
    parser.add_argument("--cores-per-node", type=int, default=16)
    parser.add_argument("--download-mb-s", type=float, default=100.0, help="assumed download rate per node")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="prepare_parts_"))
    try:
        data, split = native_pool(shared_data_root(), work / "data", args.files, args.copies)
        files = sum(1 for _ in data.rglob("*.dcm"))
        write_config(work / "conf", data, split)
        rows: dict[str, list[tuple[float, float]]] = {}
        slices = 0
        for repeat in range(args.repeats):
            order = ["single", "one part", "two parts"]
            order = order[repeat % 3 :] + order[: repeat % 3]
            for name in order:
                out = work / f"out-{repeat}-{name.replace(' ', '_')}"
                conf = work / "conf"
                if name == "single":
                    rows.setdefault("single run", []).append(timed([command(conf, out)]))
                    slices = slices_written(out)
                    continue
                parts = 1 if name == "one part" else 2
                parts_cmds = [command(conf, out, f"parts={parts}", f"part={i}") for i in range(parts)]
                rows.setdefault(f"{name}: parts", []).append(timed(parts_cmds))
                rows.setdefault(f"{name}: merge", []).append(
                    timed([command(conf, out, f"parts={parts}", "merge=true")])
                )
                assert slices_written(out) > 0
                shutil.rmtree(out)
        med = {
            k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v))
            for k, v in rows.items()
        }
        print(cpu_banner())
        print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load {os.getloadavg()[0]:.1f}")
        print(
            f"{files} uncompressed CT/MR/PT DICOM files of {len(split)} repositories, {slices} slices written; "
            f"medians of {args.repeats} repeats, one worker per process\n"
        )
        print("| configuration | wall s | CPU s | CPU ms per slice |")
        print("|---|---|---|---|")
        for key, (wall, cpu) in med.items():
            print(f"| {key} | {wall:.2f} | {cpu:.2f} | {1000 * cpu / slices:.2f} |")
        one = med["one part: parts"][0] + med["one part: merge"][0]
        two = med["two parts: parts"][0] + med["two parts: merge"][0]
        print(
            f"\nparts phase speed-up, 2 parts side by side vs 1: {med['one part: parts'][0] / med['two parts: parts'][0]:.2f}x "
            f"(end to end with the merge {one / two:.2f}x)"
        )
        single_cpu = med["single run"][1]
        parts_cpu = med["one part: parts"][1] + med["one part: merge"][1]
        print(f"1 part + merge vs one run: CPU {100 * (parts_cpu / single_cpu - 1):+.1f}%")

        part_ms = 1000 * med["two parts: parts"][1] / slices
        merge_ms = 1000 * med["two parts: merge"][1] / slices
        print(
            f"\nProjection from {part_ms:.2f} ms CPU per slice in the parts and {merge_ms:.2f} ms in the merge (one "
            f"process), {args.cores_per_node} cores per node, {args.download_mb_s:.0f} MB/s download per node "
            "(assumed), 460 KB per uncompressed file (the IDC's mean CT file), decode cost as measured here:\n"
        )
        print("| scale | slices | raw TB | nodes | parts h (CPU bound) | download h | merge h | total h |")
        print("|---|---|---|---|---|---|---|---|")
        for label, n_slices in (("reference study", 4.5e6), ("IDC CT/MR/PET", 23.2e12 / 460e3)):
            tb = n_slices * 460e3 / 1e12
            for nodes in (1, 8, 32, 128):
                parts_h = n_slices * part_ms / 1000 / (nodes * args.cores_per_node) / 3600
                download_h = tb * 1e6 / (nodes * args.download_mb_s) / 3600
                merge_h = n_slices * merge_ms / 1000 / 3600
                total = max(parts_h, download_h) + merge_h
                print(
                    f"| {label} | {n_slices / 1e6:.1f} M | {tb:.1f} | {nodes} | {parts_h:.2f} | {download_h:.2f} | "
                    f"{merge_h:.2f} | {total:.2f} |"
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

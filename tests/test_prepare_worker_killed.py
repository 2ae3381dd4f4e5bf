"""A prepare worker killed as the out-of-memory killer kills (SIGKILL) ends the run with a clear error at
once, instead of leaving the parent waiting forever for the lost batch; the rerun resumes from the work
cache and writes the same bytes as an uninterrupted run."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prepare_helpers import make_pool, write_pool_config

from modality.prepare import is_prepared


def prepare_command(conf_dir: Path, out_dir: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "modality.prepare",
        f"hydra.searchpath=[file://{conf_dir}]",
        "dataset=workerpool",
        f"out_dir={out_dir}",
        "image_size=64",
        "workers=2",
        "shard_max_samples=8",
        "progress=false",
        "charts=false",
    ]


def pool_workers(pid: int) -> list[int]:
    """Child processes of ``pid`` running the same command line: the forked pool workers."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        own = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    workers = []
    for child in map(int, children):
        try:
            if Path(f"/proc/{child}/cmdline").read_bytes() == own:
                workers.append(child)
        except OSError:
            continue
    return workers


def shard_bytes(out_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out_dir / "shards").iterdir())}


@pytest.fixture(scope="module")
def worker_pool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("workerpool")
    split = make_pool(base / "data", files_per_dataset=12, frames=4, size=192)
    write_pool_config(base / "conf", "workerpool", base / "data", split)
    return base


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs /proc to find the pool workers")
def test_killed_worker_fails_the_run_fast_and_the_rerun_completes_identically(
    worker_pool: Path, tmp_path: Path
) -> None:
    conf = worker_pool / "conf"
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    subprocess.run(prepare_command(conf, clean), check=True, capture_output=True, timeout=300)
    assert is_prepared(clean)

    proc = subprocess.Popen(
        prepare_command(conf, killed),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        # Kill one worker once the decode pass has cached some work (so the rerun has something to resume).
        deadline = time.monotonic() + 120
        victim = None
        while time.monotonic() < deadline and proc.poll() is None:
            workers = pool_workers(proc.pid)
            if workers and len(list((killed / "work").glob("*.work"))) >= 2:
                victim = workers[0]
                os.kill(victim, signal.SIGKILL)
                break
            time.sleep(0.01)
        assert victim is not None, "the pool finished before a worker could be killed"
        killed_at = time.monotonic()
        output, _ = proc.communicate(timeout=60)  # before the fix: the parent waited forever
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = output.decode("utf-8", "replace")
    assert proc.returncode != 0
    assert time.monotonic() - killed_at < 60
    assert "worker process of the 'decode' pass died" in text, text[-2000:]
    assert "rerun the same command" in text
    assert not is_prepared(killed)

    rerun = subprocess.run(prepare_command(conf, killed), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert is_prepared(killed)
    assert shard_bytes(killed) == shard_bytes(clean)
    assert (killed / "rejects.csv").read_bytes() == (clean / "rejects.csv").read_bytes()
    assert (killed / "summary.json").read_bytes() == (clean / "summary.json").read_bytes()


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, dead but not yet reaped by init, counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs /proc to find the pool workers")
def test_killed_parent_takes_its_workers_along_and_the_rerun_is_not_locked_out(
    worker_pool: Path, tmp_path: Path
) -> None:
    """Workers left behind by a killed prepare would hold the out_dir lock: the rerun would wait for ever."""
    conf, out = worker_pool / "conf", tmp_path / "out"
    proc = subprocess.Popen(
        prepare_command(conf, out),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None and not workers:
            if len(list((out / "work").glob("*.work"))) >= 1:
                workers = pool_workers(proc.pid)
            time.sleep(0.01)
        assert workers, "the pool finished before the parent could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(alive(pid) for pid in workers):
            time.sleep(0.05)
        assert not any(alive(pid) for pid in workers)
    finally:
        with contextlib.suppress(ProcessLookupError):  # whatever is left of the session (nothing, once fixed)
            os.killpg(proc.pid, signal.SIGKILL)
    rerun = subprocess.run(prepare_command(conf, out), capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert is_prepared(out)

"""Partitioned prepare: ``parts=N part=i`` then ``parts=N merge=true`` writes what one run writes, byte for byte.

The pool is small enough that a run takes seconds; caps are set so that one dataset is over its cap (its
files are decoded by the merge, after capping) while the others are decoded by the parts.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prepare_helpers import make_pool, write_dicom, write_pool_config

from modality.prepare import is_prepared
from modality.records import InputItem
from modality.shards.parts import PARTS_DIR, RECORD_NAME, partition, read_record, work_unit

# ---------------------------------------------------------------- the partition


def listing(n_units: int = 23, seed: int = 0) -> list[InputItem]:
    rng = random.Random(seed)
    items = []
    for unit in range(n_units):
        for i in range(rng.randint(1, 9)):
            items.append(
                InputItem(
                    path=f"/pool/d{unit % 3}/series{unit}/im{i}.dcm", dataset=f"d{unit % 3}", kind="dicom"
                )
            )
    return items


def test_partition_keeps_units_whole_and_balances_files() -> None:
    items = listing()
    parts = partition(items, 4)
    assert sorted(i for p in parts for i in p) == list(range(len(items)))  # every file exactly once
    owner = {work_unit(items[i]): k for k, p in enumerate(parts) for i in p}
    for k, p in enumerate(parts):
        assert all(owner[work_unit(items[i])] == k for i in p)  # a unit never spans two parts
    sizes = [len(p) for p in parts]
    biggest_unit = max(sum(1 for i in items if work_unit(i) == u) for u in owner)
    assert max(sizes) - min(sizes) <= biggest_unit  # the greedy bound


def test_partition_does_not_depend_on_listing_order() -> None:
    items = listing()
    shuffled = items[:]
    random.Random(1).shuffle(shuffled)

    def assignment(listed: list[InputItem]) -> dict[str, int]:
        return {listed[i].path: k for k, p in enumerate(partition(listed, 3)) for i in p}

    assert assignment(items) == assignment(shuffled)


def test_series_uid_is_the_unit_where_the_source_names_one() -> None:
    a = InputItem(path="/x/a/1.dcm", dataset="d", kind="dicom", series_uid="1.2.3")
    b = InputItem(path="/x/b/2.dcm", dataset="d", kind="dicom", series_uid="1.2.3")
    c = InputItem(path="/x/a/3.dcm", dataset="d", kind="dicom")
    assert work_unit(a) == work_unit(b) != work_unit(c)


# ---------------------------------------------------------------- parts + merge == one run


def prepare_command(conf_dir: Path, out_dir: Path, *overrides: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "modality.prepare",
        f"hydra.searchpath=[file://{conf_dir}]",
        "dataset=partpool",
        f"out_dir={out_dir}",
        "image_size=32",
        "workers=0",
        "shard_max_samples=7",
        "progress=false",
        "charts=false",
        "caps.CT=9",  # binds (12 CT slices a site): multi-frame CT/MR decoded by the merge after capping
        *overrides,
    ]


def prepare(
    conf_dir: Path, out_dir: Path, *overrides: str, check: bool = True
) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        prepare_command(conf_dir, out_dir, *overrides), capture_output=True, text=True, timeout=300
    )
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def output_hashes(out_dir: Path) -> dict[str, str]:
    """sha256 of what users read: shards, summary, rejects (not logs, work caches or parts)."""
    files = [*sorted((out_dir / "shards").iterdir()), out_dir / "summary.json", out_dir / "rejects.csv"]
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("partpool")
    split = make_pool(base / "data", files_per_dataset=8, frames=3, size=40)
    # a file that cannot be read, to show rejects travel through the parts
    (base / "data" / "site_b" / "broken").mkdir(parents=True)
    (base / "data" / "site_b" / "broken" / "bad.dcm").write_bytes(b"DICM" * 10)
    write_dicom(base / "data" / "site_c" / "single" / "one.dcm", patient_id="site_c-P9", seed=99, size=40)
    conf = base / "conf"
    write_pool_config(conf, "partpool", base / "data", split)
    return base, conf


@pytest.fixture(scope="module")
def single_run(pool: tuple[Path, Path]) -> dict[str, str]:
    base, conf = pool
    prepare(conf, base / "single")
    return output_hashes(base / "single")


def test_parts_then_merge_write_the_same_bytes_as_one_run(
    pool: tuple[Path, Path], single_run: dict[str, str]
) -> None:
    base, conf = pool
    out = base / "parts3"
    for part in (2, 0, 1):  # any order
        prepare(conf, out, "parts=3", f"part={part}")
        assert not is_prepared(out)  # a part alone is not a prepared folder
    heads = [read_record(out / PARTS_DIR / f"{k:04d}-of-0003") for k in range(3)]
    assert all(h is not None for h in heads)
    assert sum(h[0]["files"] for h in heads) == 8 * 3 + 2  # every listed file in exactly one part
    assert sum(h[0]["decoded_files"] for h in heads) == 1  # the single-frame file; the rest after capping
    proc = prepare(conf, out, "parts=3", "merge=true")
    assert is_prepared(out)
    assert output_hashes(out) == single_run, proc.stdout


def test_merge_names_the_parts_it_lacks_and_writes_nothing(pool: tuple[Path, Path]) -> None:
    base, conf = pool
    out = base / "missing"
    prepare(conf, out, "parts=3", "part=1")
    proc = prepare(conf, out, "parts=3", "merge=true", check=False)
    assert proc.returncode != 0
    assert "part(s) 0, 2 of 3 not finished" in proc.stderr
    assert not is_prepared(out) and not (out / "shards").exists()


def test_merge_refuses_parts_made_with_other_preprocessing(pool: tuple[Path, Path]) -> None:
    base, conf = pool
    out = base / "stale"
    prepare(conf, out, "parts=1", "part=0", "scaling=minmax")
    proc = prepare(conf, out, "parts=1", "merge=true", check=False)
    assert proc.returncode != 0 and "made for other inputs or settings" in proc.stderr
    # the decode budget decides which files a part rejects: another one, other parts
    prepare(conf, out, "parts=1", "part=0")
    budget = prepare(conf, out, "parts=1", "merge=true", "decode_budget.max_frame_pixels=100", check=False)
    assert budget.returncode != 0 and "made for other inputs or settings" in budget.stderr
    # caps and seed are the merge's alone: changing them needs no part rerun
    prepare(conf, out, "parts=1", "merge=true", "seed=3", "caps.CT=2")
    assert is_prepared(out)


@pytest.fixture(scope="module")
def bigger_pool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Enough work (72 files of 4 frames) that a part is still running when the test kills it."""
    base = tmp_path_factory.mktemp("killpool")
    split = make_pool(base / "data", files_per_dataset=24, frames=4, size=128)
    write_pool_config(base / "conf", "partpool", base / "data", split)
    return base


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="SIGKILL semantics of Linux")
def test_a_killed_part_rerun_alone_completes(bigger_pool: Path) -> None:
    """Kill part 0 (SIGKILL, as a node failure or the OOM killer would) once it has cached some work; rerun
    only it; the merge then writes what one run writes."""
    conf = bigger_pool / "conf"
    no_caps = ("caps.CT=null", "caps.MR=null", "workers=1")  # every file decoded by its part
    prepare(conf, bigger_pool / "single", *no_caps)
    out = bigger_pool / "killed"
    prepare(conf, out, "parts=2", "part=1", *no_caps)
    command = prepare_command(conf, out, "parts=2", "part=0", *no_caps)
    proc = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    folder = out / PARTS_DIR / "0000-of-0002"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if any((folder / "work").glob("*.work")):
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.005)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the part finished before it could be killed"
    assert not (folder / RECORD_NAME).exists()  # killed: not finished
    refused = prepare(conf, out, "parts=2", "merge=true", *no_caps, check=False)
    assert refused.returncode != 0 and "part(s) 0 of 2 not finished" in refused.stderr
    prepare(conf, out, "parts=2", "part=0", *no_caps)  # the rerun of that part alone
    prepare(conf, out, "parts=2", "merge=true", *no_caps)
    assert output_hashes(out) == output_hashes(bigger_pool / "single")


def test_parts_as_a_hydra_multirun_on_the_submitit_local_launcher(
    pool: tuple[Path, Path], single_run: dict[str, str]
) -> None:
    """The launchers training uses: submitit_local runs the parts as separate processes, side by side."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    base, conf = pool
    out = base / "multirun"
    command = prepare_command(conf, out, "parts=2", "part=range(2)", "hydra/launcher=submitit_local")
    command.insert(3, "--multirun")
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    prepare(conf, out, "parts=2", "merge=true")
    assert output_hashes(out) == single_run
    assert sorted(p.name for p in (out / "logs" / "multirun").glob("*/part-*")) == ["part-0", "part-1"]


def test_the_slurm_command_composes_one_job_per_part_with_its_own_log_folder() -> None:
    """`-m ... parts=N 'part=range(N)' hydra/launcher=submitit_slurm` (docs/prepare.md): the stock launcher, and
    each part's logs under out_dir, not ./multirun."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_dir

    from modality.paths import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(
            "prepare",
            overrides=["hydra/launcher=submitit_slurm", "out_dir=/data/pool", "parts=8", "part=3"],
            return_hydra_config=True,
        )
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.sweep.subdir == "part-3"
    assert str(cfg.hydra.sweep.dir).startswith("/data/pool/logs/multirun/")


@pytest.mark.parametrize("text", ["", "{bad", "[1]", '{"record_version": 1, "files": 1}\n{"item": {}}\n'])
def test_a_damaged_record_reads_as_an_unfinished_part(tmp_path: Path, text: str) -> None:
    (tmp_path / RECORD_NAME).write_text(text)
    assert read_record(tmp_path) is None


@pytest.mark.parametrize(("part", "parts"), [("x", 2), (1.5, 2), (True, 2), (0, 0), (2, 2), (-1, 2)])
def test_part_numbers_must_be_whole_and_in_range(part: object, parts: object) -> None:
    from modality.shards.parts import check_part

    with pytest.raises(ValueError, match="parts"):
        check_part(part, parts)
    assert check_part("1", 2) == (1, 2)

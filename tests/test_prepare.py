"""``python -m modality.prepare`` end to end on small hand-written pools: determinism, guards, restarts."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from prepare_helpers import make_pool, write_dicom, write_pool_config

from modality.intensity.value_stats import VALUE_FEATURES
from modality.labels import BodyPartMap, ClassMap
from modality.prepare import build_in_subprocess, is_prepared
from modality.shards.build import BuildSettings, build_shards
from modality.shards.splits import LeakageError
from modality.shards.work import WorkCache
from modality.sources.folders import DicomFolderSource

PREPROCESS = {
    "image_size": 32,
    "aspect": "pad",
    "scaling": {"method": "percentile", "low": 0.5, "high": 99.5},
    "colour": "grey",
}


def settings(out_dir: Path, split: dict[str, str], **overrides) -> BuildSettings:
    values = {
        "out_dir": out_dir,
        "split_of": split,
        "class_map": ClassMap.default(),
        "body_part_map": BodyPartMap.default(),
        "preprocess": PREPROCESS,
        "caps": {"CT": 1000, "MR": 1000},
        "workers": 0,
        "shard_max_samples": 5,
        "progress": False,
        "charts": False,
    }
    values.update(overrides)
    return BuildSettings(**values)


def pool_items(root: Path, split: dict[str, str]) -> list:
    return [item for dataset in split for item in DicomFolderSource(root / dataset, dataset).items()]


def shard_bytes(out_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out_dir / "shards").iterdir())}


def read_samples(out_dir: Path) -> list[dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for path in sorted((out_dir / "shards").glob("*.tar")):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {"__shard__": path.name.encode()})[ext] = tar.extractfile(
                    member
                ).read()
    return list(samples.values())


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("pool")
    return root, make_pool(root)


def test_small_pool_writes_every_slice_with_its_metadata(pool, tmp_path: Path) -> None:
    root, split = pool
    build_shards(pool_items(root, split), settings(tmp_path, split))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["inputs"]["files"] == 12 and summary["inputs"]["rejected_files"] == 0
    assert summary["splits"]["train"]["samples"] == 24 and summary["splits"]["val"]["samples"] == 12
    assert summary["splits"]["train"]["by_dataset"] == {
        "site_a": {"CT": 6, "MR": 6},
        "site_b": {"CT": 6, "MR": 6},
    }
    assert [s["samples"] for s in summary["splits"]["train"]["shards"]] == [5, 5, 5, 5, 4]
    samples = read_samples(tmp_path)
    assert len(samples) == 36
    for sample in samples:
        meta = json.loads(sample["json"])
        assert set(meta) >= {
            "dataset", "class", "modality", "body_part_raw", "body_part", "patient_id", "study_uid",
            "series_uid", "slice_index", "original_shape", "dtype", "photometric", "transfer_syntax",
            "scaling", "source_path", "pixel_hash", "value_features",
        }  # fmt: skip
        assert len(meta["value_features"]) == len(VALUE_FEATURES)
        assert int(sample["cls"]) == ClassMap.default().index(meta["class"])
        assert meta["body_part"] == "chest"
        assert np.asarray(Image.open(io.BytesIO(sample["png"]))).shape == (32, 32)
    # Shards mix datasets: with 2 train datasets shuffled together, some train shard holds both.
    by_shard: dict[bytes, set[str]] = {}
    for sample in samples:
        by_shard.setdefault(sample["__shard__"], set()).add(json.loads(sample["json"])["dataset"])
    assert any(len(v) > 1 for v in by_shard.values())
    assert is_prepared(tmp_path)


def test_stats_equal_numpy_float64_on_stored_pixels(pool, tmp_path: Path) -> None:
    root, split = pool
    build_shards(pool_items(root, split), settings(tmp_path, split))
    summary = json.loads((tmp_path / "summary.json").read_text())
    train = [s for s in read_samples(tmp_path) if s["__shard__"].startswith(b"train")]
    pixels = np.concatenate([np.asarray(Image.open(io.BytesIO(s["png"]))).ravel() for s in train]).astype(
        np.float64
    )
    stats = summary["stats"]["train"]
    assert stats["pixels"] == pixels.size
    assert stats["mean"] == pytest.approx(pixels.mean(), rel=1e-12, abs=1e-12)
    assert stats["std"] == pytest.approx(pixels.std(), rel=1e-12, abs=1e-12)


def test_same_inputs_and_seed_give_byte_identical_shards_whatever_the_workers(pool, tmp_path: Path) -> None:
    root, split = pool
    build_shards(pool_items(root, split), settings(tmp_path / "a", split, workers=0))
    build_shards(pool_items(root, split), settings(tmp_path / "b", split, workers=2))
    assert shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b")
    build_shards(pool_items(root, split), settings(tmp_path / "c", split, seed=1))
    assert shard_bytes(tmp_path / "a") != shard_bytes(tmp_path / "c")


def test_npy_format_stores_raw_uint8(pool, tmp_path: Path) -> None:
    root, split = pool
    build_shards(pool_items(root, split), settings(tmp_path, split, image_format="npy"))
    sample = read_samples(tmp_path)[0]
    image = np.load(io.BytesIO(sample["npy"]), allow_pickle=False)
    assert image.dtype == np.uint8 and image.shape == (32, 32)


def test_dataset_missing_from_split_is_a_clear_error(pool, tmp_path: Path) -> None:
    root, split = pool
    partial = {k: v for k, v in split.items() if k != "site_c"}
    with pytest.raises(ValueError, match=r"missing from the pool.s `split` map.*site_c"):
        build_shards(pool_items(root, split), settings(tmp_path, partial))
    assert not (tmp_path / "shards").exists()


def test_patient_guard_fires_on_planted_collision(tmp_path: Path) -> None:
    write_dicom(tmp_path / "data/site_a/x.dcm", patient_id="SHARED-7", seed=1)
    write_dicom(tmp_path / "data/site_b/y.dcm", patient_id="SHARED-7", seed=2)
    split = {"site_a": "train", "site_b": "test"}
    with pytest.raises(LeakageError, match="SHARED-7") as info:
        build_shards(pool_items(tmp_path / "data", split), settings(tmp_path / "out", split))
    assert "site_a (train" in str(info.value) and "site_b (test" in str(info.value)
    assert not (tmp_path / "out/summary.json").exists()


def test_identical_image_guard_fires_on_planted_copy(tmp_path: Path) -> None:
    original = write_dicom(tmp_path / "data/site_a/orig.dcm", patient_id="A1", seed=5)
    # Same pixels, another patient id: only the pixel hash can catch it.
    write_dicom(tmp_path / "data/site_b/copy.dcm", patient_id="B1", seed=5)
    split = {"site_a": "train", "site_b": "val"}
    with pytest.raises(LeakageError, match="identical") as info:
        build_shards(pool_items(tmp_path / "data", split), settings(tmp_path / "out", split))
    assert str(original) in str(info.value) and "copy.dcm" in str(info.value)


def test_duplicate_within_split_is_dropped_and_recorded(tmp_path: Path) -> None:
    write_dicom(tmp_path / "data/site_a/orig.dcm", patient_id="A1", seed=5)
    write_dicom(tmp_path / "data/site_a/zcopy.dcm", patient_id="A1", seed=5)
    split = {"site_a": "train"}
    build_shards(pool_items(tmp_path / "data", split), settings(tmp_path / "out", split))
    rejects = (tmp_path / "out/rejects.csv").read_text()
    assert (
        "zcopy.dcm" in rejects
        and "duplicate of" in rejects
        and "orig.dcm" in rejects.split("duplicate of")[1]
    )
    assert json.loads((tmp_path / "out/summary.json").read_text())["splits"]["train"]["samples"] == 1


def test_broken_and_excluded_files_are_rejected_with_reasons(tmp_path: Path) -> None:
    write_dicom(tmp_path / "data/site_a/good.dcm", seed=1)
    write_dicom(tmp_path / "data/site_a/us.dcm", modality="US", seed=2)
    good = (tmp_path / "data/site_a/good.dcm").read_bytes()
    (tmp_path / "data/site_a/truncated.dcm").write_bytes(good[: len(good) // 2])
    (tmp_path / "data/site_a/notdicom.dcm").write_bytes(b"hello world")
    split = {"site_a": "train"}
    build_shards(pool_items(tmp_path / "data", split), settings(tmp_path / "out", split))
    rows = (tmp_path / "out/rejects.csv").read_text().splitlines()
    by_file = {row.split(",")[0].rsplit("/", 1)[-1]: row for row in rows[1:]}
    assert set(by_file) == {"us.dcm", "truncated.dcm", "notdicom.dcm"}
    assert "modality not in class map (US)" in by_file["us.dcm"]
    assert all(row.split(",")[3] for row in rows[1:])  # every row has a reason
    inputs = json.loads((tmp_path / "out/summary.json").read_text())["inputs"]
    assert (inputs["files"], inputs["written_files"], inputs["rejected_files"]) == (4, 1, 3)


def test_caps_apply_per_dataset_and_record_over_cap(pool, tmp_path: Path) -> None:
    root, split = pool
    build_shards(pool_items(root, split), settings(tmp_path, split, caps={"CT": 2}))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["splits"]["train"]["by_dataset"]["site_a"] == {"CT": 2, "MR": 6}
    # Two CT patients in site_a: one slice from each.
    patients = {
        json.loads(s["json"])["patient_id"]
        for s in read_samples(tmp_path)
        if json.loads(s["json"])["dataset"] == "site_a" and json.loads(s["json"])["class"] == "CT"
    }
    assert patients == {"site_a-P0", "site_a-P1"}
    assert "over cap" in (tmp_path / "rejects.csv").read_text()


# ---------------------------------------------------------------- the command line, killed and resumed


def prepare_command(conf_dir: Path, out_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "modality.prepare",
        f"hydra.searchpath=[file://{conf_dir}]",
        "dataset=killpool",
        f"out_dir={out_dir}",
        "image_size=64",
        "workers=1",
        "shard_max_samples=8",
        "progress=false",
        *extra,
    ]


@pytest.fixture(scope="module")
def kill_pool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("killpool")
    split = make_pool(base / "data", files_per_dataset=14, frames=4, size=256)
    write_pool_config(base / "conf", "killpool", base / "data", split)
    return base


def run_until(command: list[str], ready, timeout: float = 120) -> bool:
    """Start ``command``, SIGKILL it as soon as ``ready()`` holds; True if it was still running then."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None and not ready():
        time.sleep(0.005)
    was_running = proc.poll() is None
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return was_running


def assert_no_partial_under_final_name(out_dir: Path) -> None:
    for tar_path in (out_dir / "shards").glob("*.tar") if (out_dir / "shards").exists() else []:
        with tarfile.open(tar_path) as tar:  # a truncated tar raises here
            assert len(tar.getmembers()) % 3 == 0


def test_killed_run_resumes_to_byte_identical_shards(kill_pool: Path, tmp_path: Path) -> None:
    conf = kill_pool / "conf"
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    # One sample per shard: the write phase fsyncs dozens of shards, long enough to be killed inside.
    extra = ("shard_max_samples=1",)
    build_in_subprocess(
        "killpool", clean, [f"hydra.searchpath=[file://{conf}]", "image_size=64", "workers=1", *extra]
    )
    assert is_prepared(clean)

    # Kill 1: during the decode pass, after a few files are cached.
    assert run_until(
        prepare_command(conf, killed, *extra), lambda: len(list((killed / "work").glob("*.work"))) >= 5
    )
    finished_before = len(list((killed / "work").glob("*.work")))
    assert finished_before >= 5 and not is_prepared(killed)
    assert_no_partial_under_final_name(killed)

    # Kill 2: during shard writing (the resumed run reaches it quickly from the cache).
    def writing() -> bool:
        shard_dir = killed / "shards"
        return shard_dir.is_dir() and any(shard_dir.iterdir())

    if run_until(prepare_command(conf, killed, *extra), writing):
        assert not is_prepared(killed)
        assert_no_partial_under_final_name(killed)

    subprocess.run(prepare_command(conf, killed, *extra), check=True, capture_output=True)
    assert is_prepared(killed)
    assert shard_bytes(clean) == shard_bytes(killed)
    assert not list((killed / "shards").glob("*.partial"))
    assert (killed / "rejects.csv").read_bytes() == (clean / "rejects.csv").read_bytes()
    summary_clean = json.loads((clean / "summary.json").read_text())
    assert summary_clean == json.loads((killed / "summary.json").read_text())


def test_build_in_subprocess_reports_the_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="prepare failed"):
        build_in_subprocess("no_such_pool", tmp_path / "out")


def test_webdataset_reads_the_shards(pool, tmp_path: Path) -> None:
    import webdataset as wds

    root, split = pool
    build_shards(pool_items(root, split), settings(tmp_path, split))
    urls = [str(p) for p in sorted((tmp_path / "shards").glob("train-*.tar"))]
    dataset = wds.WebDataset(urls, shardshuffle=False).decode("l8")
    samples = list(dataset)
    assert len(samples) == 24
    assert samples[0]["png"].shape == (32, 32)
    assert isinstance(samples[0]["json"], dict) and samples[0]["cls"] in (0, 1)
    assert shutil.which("tar") is not None


def test_concurrent_builds_of_one_out_dir_build_once(kill_pool: Path, tmp_path: Path) -> None:
    """Two DDP ranks that both find the demo missing: one builds, the other waits and skips."""
    out = tmp_path / "shared_out"
    command = prepare_command(kill_pool / "conf", out, "skip_if_prepared=true")
    procs = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    outputs = [proc.communicate(timeout=300) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], [err[-2000:] for _, err in outputs]
    assert sum("skipping" in stdout for stdout, _ in outputs) == 1
    assert is_prepared(out)


def test_rerun_reuses_the_work_cache_and_prunes_stale_entries(pool, tmp_path: Path) -> None:
    root, split = pool
    build_shards(pool_items(root, split), settings(tmp_path, split))
    first = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "work").glob("*.work")}
    first_keys = WorkCache(tmp_path / "work").cached_keys()
    assert len(first_keys) == 12  # one entry per file
    build_shards(pool_items(root, split), settings(tmp_path, split))
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "work").glob("*.work")} == first  # reused
    build_shards(
        pool_items(root, split), settings(tmp_path, split, preprocess={**PREPROCESS, "image_size": 16})
    )
    second_keys = WorkCache(tmp_path / "work").cached_keys()
    assert len(second_keys) == 12 and not set(second_keys) & set(first_keys)  # new config, new work
    assert not {p.name for p in (tmp_path / "work").glob("*.work")} & set(first)  # the old files are gone


def test_keep_work_false_removes_the_cache_but_not_the_shards(pool, tmp_path: Path) -> None:
    root, split = pool
    build_shards(pool_items(root, split), settings(tmp_path, split, keep_work=False))
    assert not (tmp_path / "work").exists()
    assert is_prepared(tmp_path)

"""The leakage audit finds planted cross-split duplicates and shared patients, and passes clean shards."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from modality.commands import audit
from modality.paths import CONFIG_DIR


def _smooth_image(rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """A distinct low-frequency image: perceptual hashes of two of these are far apart."""
    coarse = rng.uniform(0, 255, size=(6, 6)).astype(np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC))


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _sample(key: str, image: np.ndarray, dataset: str, patient: str, series: str) -> dict[str, bytes]:
    meta = {
        "dataset": dataset,
        "class": "CT",
        "patient_id": patient,
        "series_uid": series,
        "pixel_hash": "",
    }
    return {"png": _png(image), "cls": b"0", "json": json.dumps(meta).encode()}


def _write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    """Stand-in for prepare's writer, following the documented shard format."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, payload in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                info.mode = 0o444
                tar.addfile(info, io.BytesIO(payload))


def _clean_split_samples(seed: int, dataset: str, n: int) -> list[tuple[str, dict[str, bytes]]]:
    rng = np.random.default_rng(seed)
    return [
        (
            f"{seed:04x}{i:016x}",
            _sample(f"{i}", _smooth_image(rng), dataset, f"{dataset}-p{i}", f"{dataset}-s{i}"),
        )
        for i in range(n)
    ]


@pytest.fixture()
def clean_shards(tmp_path: Path) -> Path:
    shards = tmp_path / "prepared" / "shards"
    shards.mkdir(parents=True)
    _write_shard(shards / "train-000000.tar", _clean_split_samples(1, "site_a", 12))
    _write_shard(shards / "val-000000.tar", _clean_split_samples(2, "site_b", 6))
    _write_shard(shards / "test-000000.tar", _clean_split_samples(3, "site_c", 6))
    return shards


def test_clean_shards_exit_zero(clean_shards: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert audit.run_audit(clean_shards.parent) == 0
    report = json.loads((clean_shards.parent / "audit.json").read_text())
    assert report["clean"] is True
    assert report["samples_by_split"] == {"test": 6, "train": 12, "val": 6}
    assert "CLEAN" in capsys.readouterr().out


def test_planted_duplicate_and_shared_patient_are_caught(clean_shards: Path, tmp_path: Path) -> None:
    train = _clean_split_samples(1, "site_a", 12)
    test = _clean_split_samples(3, "site_c", 6)
    # A copy of a train image under a new key, dataset and patient placed in the test split.
    copied_png = train[4][1]["png"]
    planted = _sample("x", np.zeros((2, 2), np.uint8), "site_c", "fresh-patient", "fresh-series")
    planted["png"] = copied_png
    test.append(("ffff0000000000000001", planted))
    # A different image of a train patient.
    rng = np.random.default_rng(99)
    test.append(
        ("ffff0000000000000002", _sample("y", _smooth_image(rng), "site_c", "site_a-p7", "new-series"))
    )
    _write_shard(clean_shards / "test-000000.tar", test)

    out = tmp_path / "report"
    # through the Hydra app, as a user runs it: every option a config key, the exit status the verdict
    command = [
        sys.executable,
        "-m",
        "modality.commands.audit",
        f"shards_dir={clean_shards}",
        f"out={out}",
        "max_hamming=4",
        "max_rms=3.0",
        f"paths.log_dir={tmp_path / 'logs'}",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "LEAKS FOUND" in done.stdout
    report = json.loads((out / "audit.json").read_text())
    assert [f["patient_id"] for f in report["patients_across_splits"]] == ["site_a-p7"]
    identical = report["identical_images_across_splits"]
    assert len(identical) == 1
    assert identical[0]["splits"] == ["test", "train"]
    assert report["series_across_splits"] == []


def test_near_duplicate_across_datasets_in_other_split(clean_shards: Path) -> None:
    train = _clean_split_samples(1, "site_a", 12)
    test = _clean_split_samples(3, "site_c", 6)
    image = np.asarray(Image.open(io.BytesIO(train[2][1]["png"])))
    noisy = np.clip(image.astype(int) + np.random.default_rng(5).integers(-2, 3, image.shape), 0, 255)
    test.append(("ffff0000000000000003", _sample("z", noisy.astype(np.uint8), "site_c", "other", "other")))
    _write_shard(clean_shards / "test-000000.tar", test)

    result = audit.audit_shards(clean_shards)
    assert result.identical_images_across_splits == []
    assert len(result.near_duplicates_across_splits) == 1
    pair = result.near_duplicates_across_splits[0]
    assert {pair["a"]["dataset"], pair["b"]["dataset"]} == {"site_a", "site_c"}
    assert pair["hamming"] <= 4


def test_near_duplicate_pairs_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, size=40, dtype=np.int64).tolist()
    # Add close variants of a few hashes (1-5 flipped bits).
    hashes = list(base)
    for i, flips in enumerate([1, 2, 3, 4, 5]):
        value = base[i]
        for bit in rng.choice(64, size=flips, replace=False):
            value ^= 1 << int(bit)
        hashes.append(value)
    expected = sorted(
        (i, j, bin(hashes[i] ^ hashes[j]).count("1"))
        for i in range(len(hashes))
        for j in range(i + 1, len(hashes))
        if bin(hashes[i] ^ hashes[j]).count("1") <= 4
    )
    assert audit.near_duplicate_pairs(hashes, 4) == expected
    assert len(expected) == 4


def test_unreadable_member_is_reported_not_crashed(clean_shards: Path) -> None:
    samples = _clean_split_samples(3, "site_c", 2)
    samples[1][1]["png"] = b"not a png"
    _write_shard(clean_shards / "test-000000.tar", samples)
    result = audit.audit_shards(clean_shards)
    assert len(result.unreadable) == 1
    assert result.unreadable[0]["key"] == samples[1][0]
    assert audit.run_audit(clean_shards) == 1


def test_members_the_shard_format_refuses_are_unreadable_as_in_training(clean_shards: Path) -> None:
    """The audit decodes members with modality.shards.decode, like the training loader: a 16-bit PNG or a
    float npy is not a stored sample it can vouch for."""
    samples = _clean_split_samples(3, "site_c", 3)
    samples[1][1]["png"] = _png(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64))
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((8, 8), np.float32), allow_pickle=False)
    del samples[2][1]["png"]
    samples[2][1]["npy"] = buffer.getvalue()
    _write_shard(clean_shards / "test-000000.tar", samples)
    result = audit.audit_shards(clean_shards)
    reasons = {entry["key"]: entry["reason"] for entry in result.unreadable}
    assert set(reasons) == {samples[1][0], samples[2][0]}
    assert "mode 'I;16'" in reasons[samples[1][0]]
    assert "uint8" in reasons[samples[2][0]]


def test_empty_folder_exit_two(tmp_path: Path) -> None:
    assert audit.run_audit(tmp_path) == 2
    # no shards_dir at all: the same status (1 would read as "leaks"), with what to type
    command = [sys.executable, "-m", "modality.commands.audit", f"paths.log_dir={tmp_path / 'logs'}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "shards_dir=" in done.stderr, done.stderr


def test_hash_collision_with_different_detail_is_not_a_duplicate() -> None:
    """Look-alike anatomy (same hash, different detail) is ruled out by the thumbnail residual."""
    rng = np.random.default_rng(7)
    base = _smooth_image(rng, 32)
    other = base.copy()
    other[8:16, 8:16] = 255 - other[8:16, 8:16]  # a bright lesion where the first has none
    noisy = np.clip(base.astype(int) + rng.integers(-2, 3, base.shape), 0, 255).astype(np.uint8)

    def sample(key: str, split: str, dataset: str, image: np.ndarray) -> audit.AuditedSample:
        return audit.AuditedSample(
            key, split, f"{split}-000000.tar", dataset, "", "", "", key, 12345, image.tobytes()
        )

    result = audit.find_leaks([sample("a", "train", "x", base), sample("b", "test", "y", other)])
    assert result.near_duplicates_across_splits == []
    assert result.near_duplicate_candidates_rejected == 1
    result = audit.find_leaks([sample("a", "train", "x", base), sample("c", "test", "y", noisy)])
    assert len(result.near_duplicates_across_splits) == 1
    assert audit.linear_fit_rms(base, (base.astype(float) * 0.5 + 20).astype(np.uint8)) < 1.0


def test_config_keys_are_the_audit_options() -> None:
    """configs/audit.yaml holds every option of run_audit, with the same defaults."""
    import inspect

    from omegaconf import OmegaConf

    config = OmegaConf.load(CONFIG_DIR / "audit.yaml")
    parameters = inspect.signature(audit.run_audit).parameters
    assert set(parameters) == {"shards_dir", "out", "max_hamming", "max_rms"}
    assert OmegaConf.is_missing(config, "shards_dir")
    for name in ("out", "max_hamming", "max_rms"):
        assert config[name] == parameters[name].default, name

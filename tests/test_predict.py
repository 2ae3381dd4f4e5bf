"""Raw-file prediction: real DICOM and image files end to end, header modality read right, nothing dropped."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from eval_demo_run import demo_multirun
from PIL import Image
from volume_files import write_metaimage, write_nrrd

from modality.evaluation.predict import PendingSlice, prediction_row, read_file_slices, series_votes
from modality.intensity.pipeline import Preprocess
from modality.labels import BodyPartMap, ClassMap
from modality.paths import PROJECT_ROOT, shared_data_root

CLASSES = ["CT", "MR", "PT", "XR"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo_multirun(tmp_path_factory.getbasetemp()) / "0" / "checkpoints" / "best.ckpt"


def _manifest() -> pd.DataFrame:
    root = shared_data_root()
    if not (root / "manifest.csv").is_file():
        pytest.skip(f"real corpus not found at {root}")
    return pd.read_csv(root / "manifest.csv", dtype=str, keep_default_na=False)


def _subset(manifest: pd.DataFrame) -> pd.DataFrame:
    """About 90 files: two per source repository, format and class (small files), names with spaces included."""
    root = shared_data_root()
    sizes = manifest["path"].map(lambda p: (root / p).stat().st_size)
    small = manifest[sizes < 3_000_000].sort_values("path")
    return small.groupby(["source_repo", "format", "class"]).head(2)


def _link(paths: list[str], dest: Path) -> None:
    root = shared_data_root()
    for rel in paths:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(root / rel)


def _predict(
    checkpoint: Path, input_dir: Path, out: Path, hydra_dir: Path, *overrides: str
) -> dict[str, list[dict[str, str]]]:
    command = [
        sys.executable,
        "eval.py",
        f"ckpt_path={checkpoint}",
        f"input={input_dir}",
        f"out={out}",
        f"hydra.run.dir={hydra_dir}",
        *overrides,
    ]
    completed = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=1800)
    assert completed.returncode == 0, completed.stderr[-3000:]
    tables = {}
    for name in ("predictions", "series_votes", "unreadable"):
        with (out / f"{name}.csv").open(newline="", encoding="utf-8") as handle:
            tables[name] = list(csv.DictReader(handle))
    return tables


def _check_every_file_accounted(tables: dict[str, list[dict[str, str]]], input_dir: Path) -> None:
    files = {str(p) for p in input_dir.rglob("*") if p.is_file()}
    predicted = {r["path"] for r in tables["predictions"]}
    unreadable = {r["path"] for r in tables["unreadable"]}
    assert files == predicted | unreadable


def _check_header_modality(
    tables: dict[str, list[dict[str, str]]], manifest: pd.DataFrame, input_dir: Path
) -> int:
    """Every predicted DICOM row carries the manifest's Modality tag; returns how many files were checked."""
    expected = dict(zip(manifest["path"], manifest["modality"].str.strip(), strict=True))
    kinds = dict(zip(manifest["path"], manifest["kind"], strict=True))
    checked = set()
    for row in tables["predictions"]:
        rel = Path(row["path"]).relative_to(input_dir).as_posix()
        if kinds.get(rel) == "dicom":
            assert row["header_modality"] == expected[rel], rel
            checked.add(rel)
        elif rel in kinds:
            assert row["header_modality"] == "" and row["header_mismatch"] == "0"
    return len(checked)


def test_prediction_on_real_files_and_other_formats(checkpoint: Path, tmp_path: Path) -> None:
    manifest = _manifest()
    subset = _subset(manifest)
    input_dir = tmp_path / "scans with spaces"
    _link(list(subset["path"]), input_dir)
    extras = input_dir / "extras"
    extras.mkdir()
    import nibabel as nib

    volume = np.random.default_rng(0).normal(100, 30, size=(20, 24, 3)).astype(np.int16)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), extras / "brain volume.nii.gz")
    nib.save(nib.AnalyzeImage(volume, np.eye(4)), extras / "pet.img")  # Analyze 7.5: pet.img + pet.hdr
    # The same voxels and geometry as MetaImage (+ its .raw) and NRRD: the same answers as the NIfTI.
    write_metaimage(extras / "ct scan.mhd", volume, np.eye(4), detached="ct scan.raw")
    write_nrrd(extras / "mr.nrrd", volume, np.eye(4), encoding="gzip")
    Image.fromarray(np.random.default_rng(3).integers(0, 4096, size=(40, 30)).astype(np.uint16)).save(
        extras / "radiograph16.tif"
    )
    np.save(extras / "slice.npy", np.random.default_rng(1).integers(0, 4000, size=(30, 20)).astype(np.uint16))
    first_png = shared_data_root() / subset[subset["format"] == "png"]["path"].iloc[0]
    Image.open(first_png).convert("L").save(extras / "radiograph.pgm")
    Image.fromarray(np.full((16, 16), 7, np.uint8)).save(extras / "blank.png")
    (extras / "garbage.dcm").write_bytes(np.random.default_rng(2).bytes(3000))
    (extras / "notes.txt").write_text("not an image")

    out = tmp_path / "out"
    tables = _predict(checkpoint, input_dir, out, tmp_path / "hydra")
    _check_every_file_accounted(tables, input_dir)
    dicom_checked = _check_header_modality(tables, manifest, input_dir)

    rows = tables["predictions"]
    assert set(rows[0]) >= {
        "path",
        "frame",
        "predicted",
        "header_modality",
        "header_class",
        "header_mismatch",
    }
    assert all(abs(sum(float(r[f"prob_{c}"]) for c in CLASSES) - 1) < 1e-4 for r in rows)
    decodable = subset[(subset["kind"] == "dicom") & (subset["decode_ok"] == "1") & (subset["usable"] == "1")]
    predicted_rel = {Path(r["path"]).relative_to(input_dir).as_posix() for r in rows}
    missed = sorted(set(decodable["path"]) - predicted_rel)
    assert not missed, f"decodable DICOM files not predicted: {missed}"
    assert dicom_checked >= 60
    # header class through the class map: CR/DX/MG/RG -> XR, codes without a class -> empty
    for row in rows:
        code, header_class = row["header_modality"], row["header_class"]
        expected_class = {
            "CT": "CT",
            "MR": "MR",
            "PT": "PT",
            "CR": "XR",
            "DX": "XR",
            "MG": "XR",
            "RG": "XR",
        }.get(code, "")
        assert header_class == expected_class
        if row["header_mismatch"] == "1":
            assert header_class and header_class != row["predicted"] and float(row["probability"]) >= 0.9

    by_name = {Path(r["path"]).name: r for r in rows}
    assert sorted(int(r["frame"]) for r in rows if r["path"].endswith("brain volume.nii.gz")) == [0, 1, 2]
    assert sorted(int(r["frame"]) for r in rows if r["path"].endswith("pet.img")) == [0, 1, 2]
    assert "slice.npy" in by_name and "radiograph.pgm" in by_name and "radiograph16.tif" in by_name
    nifti_probs = {r["frame"]: r["probability"] for r in rows if r["path"].endswith("brain volume.nii.gz")}
    for name in ("ct scan.mhd", "mr.nrrd"):
        assert {r["frame"]: r["probability"] for r in rows if r["path"].endswith(name)} == nifti_probs, name
    unreadable = {Path(r["path"]).name: r for r in tables["unreadable"]}
    assert unreadable["notes.txt"]["reason"] == "unsupported file type"
    assert unreadable["pet.hdr"]["reason"] == "Analyze header"  # read with pet.img, accounted for
    assert unreadable["ct scan.raw"]["reason"] == "volume data file"  # read with ct scan.mhd
    assert unreadable["garbage.dcm"]["reason"] and unreadable["garbage.dcm"]["frame"] == ""
    assert unreadable["blank.png"]["reason"] == "blank slice"

    votes = tables["series_votes"]
    assert len(votes) == len({r["series"] for r in rows})
    assert sum(int(v["slices"]) for v in votes) == len(rows)

    # issue 19: a file whose header names a modality that is none of the classes (US, NM, XA, OT, SC, XC) is
    # answered `other` from the header, every other file keeps the model's answer (no threshold given here)
    classes_of = dict(zip(manifest["path"], manifest["class"], strict=True))
    others = 0
    for row in rows:
        rel = Path(row["path"]).relative_to(input_dir).as_posix()
        if classes_of.get(rel) == "other":
            assert (row["decision"], row["decision_from"]) == ("other", "header"), rel
            others += 1
        else:
            assert (row["decision"], row["decision_from"]) == (row["predicted"], "pixels"), rel
    assert others >= 10
    for vote in votes:
        members = [r for r in rows if r["series"] == vote["series"]]
        if all(r["decision"] == "other" for r in members):
            assert (vote["decision"], vote["decision_from"]) == ("other", "header")
        else:
            assert vote["decision_from"] == "pixels"


def test_a_series_is_other_when_most_of_its_slices_name_a_non_target_modality() -> None:
    """The series decision follows its slices' header rule by majority; the pixel vote stays beside it."""
    rows = []
    for i, other in enumerate((True, True, False)):
        row = prediction_row(_pending("", path=f"{i}.dcm"), np.array([0.9, 0.05, 0.03, 0.02]), CLASSES, 0.9)
        row["decision"], row["decision_from"] = ("other", "header") if other else ("CT", "pixels")
        rows.append(row)
    vote = series_votes(rows, CLASSES, 0.9, unknown_below=0.99)[0]
    assert (vote["voted"], vote["decision"], vote["decision_from"]) == ("CT", "other", "header")
    vote = series_votes(rows[2:], CLASSES, 0.9, unknown_below=0.99)[0]
    assert (vote["decision"], vote["decision_from"]) == ("unknown", "threshold")


def test_the_class_map_names_other_for_dicom_codes_it_does_not_list() -> None:
    from modality.labels import ClassMap

    class_map = ClassMap.default()
    assert [class_map.names_other(c) for c in ("US", " nm ", "OT", "SC", "XA")] == [True] * 5
    targets = ("CT", "mr", "PT", "CR", "DX", "MG", "RG", "", None)
    assert [class_map.names_other(c) for c in targets] == [False] * 9
    # free text is no DICOM defined term: the pixels decide, the header does not say "other"
    assert [class_map.names_other(c) for c in ("MRI", "PET-CT", "glioma")] == [False] * 3


@pytest.mark.slow
def test_prediction_over_the_whole_real_corpus(checkpoint: Path, tmp_path: Path) -> None:
    manifest = _manifest()
    root = shared_data_root()
    tables = _predict(checkpoint, root, tmp_path / "out", tmp_path / "hydra")
    _check_every_file_accounted(tables, root)
    expected = dict(zip(manifest["path"], manifest["modality"].str.strip(), strict=True))
    checked = 0
    for row in tables["predictions"]:
        rel = Path(row["path"]).relative_to(root).as_posix()
        if manifest.loc[manifest["path"] == rel, "kind"].eq("dicom").any():
            assert row["header_modality"] == expected[rel], rel
            checked += 1
    assert checked > 1000


def _pending(header_class: str, series: str = "s1", path: str = "a.dcm") -> PendingSlice:
    image = np.zeros((4, 4), np.uint8)
    return PendingSlice(path, 0, 1, series, header_class, header_class, "", "", image)


def test_header_mismatch_needs_a_known_header_class_and_a_confident_prediction() -> None:
    confident_mr = np.array([0.03, 0.95, 0.01, 0.01])
    unsure_mr = np.array([0.2, 0.7, 0.05, 0.05])
    assert prediction_row(_pending("CT"), confident_mr, CLASSES, 0.9)["header_mismatch"] == 1
    assert prediction_row(_pending("CT"), unsure_mr, CLASSES, 0.9)["header_mismatch"] == 0
    assert prediction_row(_pending(""), confident_mr, CLASSES, 0.9)["header_mismatch"] == 0
    assert prediction_row(_pending("MR"), confident_mr, CLASSES, 0.9)["header_mismatch"] == 0
    assert prediction_row(_pending("CT"), unsure_mr, CLASSES, 0.5)["header_mismatch"] == 1


def test_series_vote_is_the_majority_with_mean_probabilities() -> None:
    probs = [np.array([0.0, 0.96, 0.02, 0.02]), np.array([0.0, 0.94, 0.03, 0.03]), np.array([0.9, 0.1, 0, 0])]
    rows = [prediction_row(_pending("CT", path=f"{i}.dcm"), p, CLASSES, 0.9) for i, p in enumerate(probs)]
    rows.append(prediction_row(_pending("MR", series="s2"), np.array([0.1, 0.8, 0.05, 0.05]), CLASSES, 0.9))
    votes = {v["series"]: v for v in series_votes(rows, CLASSES, 0.9)}
    s1 = votes["s1"]
    assert (s1["voted"], s1["slices"], s1["files"]) == ("MR", 3, 3)
    assert s1["vote_share"] == pytest.approx(2 / 3, abs=1e-6)
    assert s1["mean_prob_MR"] == pytest.approx((0.96 + 0.94 + 0.1) / 3, abs=1e-6)
    assert s1["header_mismatch"] == 0  # mean MR probability 0.67 < 0.9
    assert votes["s2"]["header_mismatch"] == 0
    lenient = {v["series"]: v for v in series_votes(rows, CLASSES, 0.6)}
    assert lenient["s1"]["header_mismatch"] == 1
    # the decision is the vote unless a fitted threshold says its confidence is too low (issue 19)
    assert {v["decision"] for v in votes.values()} == {"MR"}
    careful = {v["series"]: v for v in series_votes(rows, CLASSES, 0.9, unknown_below=0.7)}
    assert careful["s1"]["decision"] == "unknown"  # mean MR probability 0.667
    assert careful["s2"]["decision"] == "MR"  # 0.8


def test_input_files_are_routed_by_the_folder_sources_suffix_sets(tmp_path: Path) -> None:
    """eval's input= routing is modality.sources.folders.kind_of_path: checksums are never offered to the
    DICOM reader (predict's own copy of the list had drifted and lacked .md5/.sha1); an .img is Analyze only
    with its .hdr beside it, else DICOM (the shared corpus's Agfa MR files are DICOM named .img)."""
    from modality.sources.folders import NON_DICOM_SUFFIXES, kind_of_path

    (tmp_path / "pet.img").write_bytes(b"")
    (tmp_path / "pet.hdr").write_bytes(b"")
    (tmp_path / "agfa.img").write_bytes(b"")
    assert kind_of_path(tmp_path / "pet.img") == "nifti"
    assert kind_of_path(tmp_path / "agfa.img") == "dicom"

    expected = {
        "ct.dcm": "dicom",
        "IM000001": "dicom",
        "x.png": "image",
        "x.PGM": "image",
        "brain.nii.gz": "nifti",
        "stack.npy": "npy",
        "notes.txt": None,
        "x.tar.gz": None,
        "series.md5": None,
        "series.SHA1": None,
    }
    assert {name: kind_of_path(Path("d") / name) for name in expected} == expected
    assert {".md5", ".sha1", ".gz"} <= set(NON_DICOM_SUFFIXES)


def test_unknown_thresholds_from_the_calibration_reach_every_decision(
    checkpoint: Path, tmp_path: Path
) -> None:
    """calibration.json's unknown_below_* (crossval fits them on held-out sources) turn low-confidence slice
    and series answers into `unknown`; the vote and probabilities stay as they were."""
    import json

    input_dir = tmp_path / "in"
    input_dir.mkdir()
    rng = np.random.default_rng(0)
    np.save(input_dir / "a.npy", rng.integers(0, 4000, size=(30, 20)).astype(np.uint16))
    Image.fromarray(rng.integers(0, 255, size=(40, 40)).astype(np.uint8)).save(input_dir / "b.png")
    calibration = tmp_path / "calibration.json"
    calibration.write_text(
        json.dumps(
            {
                "unknown_below_slice": 0.6,
                "unknown_below_series": 0.999,
                # the series map crossval fits: here it raises every vote's stated confidence by 2 in logit
                "series_confidence": {"slope": 1.0, "count_slope": 0.0, "intercept": 2.0, "answers": 10},
            }
        )
    )
    out = tmp_path / "out"
    tables = _predict(checkpoint, input_dir, out, tmp_path / "hydra", f"calibration={calibration}")
    rows, votes = tables["predictions"], tables["series_votes"]
    assert rows and votes
    for row in rows:
        assert float(row["confidence"]) == pytest.approx(float(row["probability"]), abs=2e-6)  # no map given
        expected = "unknown" if float(row["confidence"]) < 0.6 else row["predicted"]
        assert row["decision"] == expected
    for vote in votes:
        stated = min(max(float(vote["mean_probability"]), 1e-6), 1 - 1e-6)
        mapped = 1 / (1 + np.exp(-(np.log(stated / (1 - stated)) + 2.0)))
        assert float(vote["confidence"]) == pytest.approx(mapped, abs=2e-6)
        expected = "unknown" if float(vote["confidence"]) < 0.999 else vote["voted"]
        assert vote["decision"] == expected
    summary = json.loads((out / "prediction_summary.json").read_text())
    assert summary["unknown_below"] == {"slice": 0.6, "series": 0.999}
    assert sum(summary["series_by_decision"].values()) == len(votes)


def test_the_value_head_reads_a_volume_stored_wider_than_8_bits_and_abstains_on_an_8bit_one(
    tmp_path: Path,
) -> None:
    """The same anatomy as int16 (values in units) and as uint8 (a windowed export, display values): only the
    first gets value statistics, so the CNN alone answers the 8-bit volume (``has_physical_units``)."""
    import nibabel as nib

    rng = np.random.default_rng(0)
    wide = rng.normal(40, 300, size=(24, 20, 3)).astype(np.int16)
    eight = np.clip((wide.astype(np.float32) + 160) / 400 * 255, 0, 255).astype(np.uint8)
    nib.save(nib.Nifti1Image(wide, np.eye(4)), tmp_path / "ct.nii.gz")
    nib.save(nib.Nifti1Image(eight, np.eye(4)), tmp_path / "ct_export.nii.gz")
    preprocess = Preprocess.from_dict({"image_size": 32, "scaling": {"method": "percentile"}})
    read = {
        name: read_file_slices(
            tmp_path / name, preprocess, ClassMap.default(), BodyPartMap.default(), CLASSES
        )
        for name in ("ct.nii.gz", "ct_export.nii.gz")
    }
    for name, (slices, unreadable) in read.items():
        assert len(slices) == 3 and not unreadable, name
    assert all(s.value_features is not None for s in read["ct.nii.gz"][0])
    assert all(s.value_features is None for s in read["ct_export.nii.gz"][0])

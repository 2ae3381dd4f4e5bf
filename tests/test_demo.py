"""The built-in demo dataset: real, decodable DICOM with each site's storage quirks, deterministic,
split-complete, and never mistaken for complete after a killed generation."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
import pytest
from omegaconf import OmegaConf
from pydicom.pixels import apply_modality_lut
from pydicom.uid import JPEG2000Lossless, RLELossless

from modality.demo import generator as demo
from modality.demo import phantoms
from modality.paths import CONFIG_DIR
from modality.records import InputItem

SCALE = 0.05  # two patients per class per site: ~850 files, a few seconds on two cores


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo") / "dicom"
    demo.generate_demo(root, seed=0, scale=SCALE, workers=2)
    return root


@pytest.fixture(scope="module")
def headers(demo_root: Path) -> dict[str, pydicom.Dataset]:
    return {
        item.path: pydicom.dcmread(item.path, stop_before_pixels=True)
        for item in demo.list_demo_files(demo_root)
    }


def _by_site_and_modality(headers: dict[str, pydicom.Dataset]) -> dict[tuple[str, str], list[str]]:
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    for path, ds in headers.items():
        groups[(Path(path).parents[3].name, ds.Modality)].append(path)
    return groups


def _one_per_series(headers: dict[str, pydicom.Dataset]) -> list[str]:
    firsts: dict[str, str] = {}
    for path, ds in sorted(headers.items()):
        firsts.setdefault(ds.SeriesInstanceUID, path)
    return sorted(firsts.values())


# ---------------------------------------------------------------------------------------------------
# Phantom primitives
# ---------------------------------------------------------------------------------------------------


def test_later_ellipsoids_paint_over_earlier_ones() -> None:
    body = phantoms.Ellipsoid((0, 0, 0), (50, 50, 50), "soft")
    organ = phantoms.Ellipsoid((0, 0, 0), (10, 10, 10), "bone")
    xs = np.array([-30.0, 0.0, 30.0, 80.0], dtype=np.float32)
    labels = phantoms.paint_labels((body, organ), xs, np.zeros(1, np.float32), np.zeros(1, np.float32))[0, 0]
    names = [phantoms.TISSUE_NAMES[i] for i in labels]
    assert names == ["soft", "bone", "soft", "air"]


def test_projection_of_a_sphere_is_its_chord_times_attenuation() -> None:
    sphere = phantoms.Phantom(
        "test", (phantoms.Ellipsoid((0, 0, 0), (40, 40, 40), "bone"),), (-1, 1), (100, 100), "coronal"
    )
    integral = phantoms.project_attenuation(sphere, "z", rows=41, cols=41, spacing=2.0, depth_step=0.5)
    mu_bone = phantoms.XR_MU[phantoms.TISSUE_INDEX["bone"]]
    assert integral[20, 20] == pytest.approx(80.0 * mu_bone, rel=0.02)
    assert integral[0, 0] == 0.0  # the corner ray misses the sphere
    chord_at_30 = 2 * np.sqrt(40.0**2 - 30.0**2)
    assert integral[20, 35] == pytest.approx(chord_at_30 * mu_bone, rel=0.05)


def test_stored_values_invert_the_modality_lut_and_respect_bits_stored() -> None:
    hu = np.array([-1024.0, -1000.0, 0.0, 40.0, 3500.0], dtype=np.float32)
    stored = demo.to_stored(hu, signed=False, bits_stored=12, slope=1.0, intercept=-1024.0)
    assert stored.dtype == np.uint16
    assert stored.tolist() == [0, 24, 1024, 1064, 4095]  # 3500 HU clipped to the 12-bit ceiling
    stored = demo.to_stored(hu, signed=True, bits_stored=16, slope=0.5, intercept=-1024.0)
    assert (stored.astype(np.float32) * 0.5 - 1024.0).tolist() == hu.tolist()
    assert demo.stored_range(True, 12) == (-2048, 2047)


# ---------------------------------------------------------------------------------------------------
# Files, quirks, decoding
# ---------------------------------------------------------------------------------------------------


def test_items_list_every_file_once_sorted_without_labels(demo_root: Path) -> None:
    items = demo.DemoSource(demo_root, seed=0, scale=SCALE)  # noqa: F841 - constructing must not generate
    listed = demo.list_demo_files(demo_root)
    marker = json.loads((demo_root / demo.MARKER).read_text())
    assert len(listed) == marker["files"] > 500
    assert [i.path for i in listed] == sorted(i.path for i in listed)
    assert all(i.kind == "dicom" and i.label is None and Path(i.path).is_absolute() for i in listed)
    assert {i.dataset for i in listed} == set(demo.SPLIT)
    assert not any(Path(i.path).name.endswith(".json") for i in listed)


def test_files_are_real_dicom_with_file_meta_and_preamble(headers: dict[str, pydicom.Dataset]) -> None:
    sop_classes = set()
    for path, ds in headers.items():
        with open(path, "rb") as handle:
            assert handle.read(132)[128:] == b"DICM"
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        sop_classes.add(ds.SOPClassUID.name)
    assert sop_classes == {
        "CT Image Storage",
        "MR Image Storage",
        "Positron Emission Tomography Image Storage",
        "Computed Radiography Image Storage",
        "Digital X-Ray Image Storage - For Presentation",
        "Digital Mammography X-Ray Image Storage - For Presentation",
    }


def test_each_site_stores_the_same_modality_differently(headers: dict[str, pydicom.Dataset]) -> None:
    groups = _by_site_and_modality(headers)

    def first(site: str, code: str) -> pydicom.Dataset:
        return headers[groups[(site, code)][0]]

    assert first("site_a", "CT").BitsStored == 12 and first("site_a", "CT").PixelRepresentation == 0
    assert first("site_a", "CT").RescaleIntercept == -1024
    assert first("site_b", "CT").PixelRepresentation == 1 and first("site_b", "CT").RescaleIntercept == 0
    assert first("site_e", "CT").RescaleSlope == 0.5
    padded = pydicom.dcmread(groups[("site_b", "CT")][0])
    assert padded.PixelPaddingValue == -2000 and padded.pixel_array.min() == -2000
    assert "PixelPaddingValue" not in first("site_a", "CT")
    assert first("site_a", "CR").PhotometricInterpretation == "MONOCHROME1"
    assert first("site_b", "DX").PhotometricInterpretation == "MONOCHROME2"
    assert first("site_c", "CT").file_meta.TransferSyntaxUID == RLELossless
    assert first("site_d", "CT").file_meta.TransferSyntaxUID == JPEG2000Lossless
    assert first("site_b", "CT").file_meta.TransferSyntaxUID.is_implicit_VR
    assert "BodyPartExamined" not in first("site_d", "CT")
    pet_slopes = {float(headers[p].RescaleSlope) for p in groups[("site_a", "PT")]}
    assert len(pet_slopes) > 10 and any(s != round(s) for s in pet_slopes)  # a float slope per image
    assert not any(Path(p).suffix for p in groups[("site_b", "CT")])  # exported without extensions


def test_body_part_spellings_differ_between_sites(headers: dict[str, pydicom.Dataset]) -> None:
    spellings = {ds.get("BodyPartExamined") for ds in headers.values() if ds.Modality in ("CT", "CR", "DX")}
    assert {"CHEST", "Thorax", "LUNG", "THORAX"} <= spellings
    assert None in spellings  # site_d leaves the tag out


def test_every_series_decodes_with_pydicom(headers: dict[str, pydicom.Dataset]) -> None:
    for path in _one_per_series(headers):
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array
        assert pixels.shape == (ds.Rows, ds.Columns)
        low, high = demo.stored_range(bool(ds.PixelRepresentation), ds.BitsStored)
        assert low <= int(pixels.min()) and int(pixels.max()) <= high, path
        assert pixels.std() > 0, path


def test_every_series_decodes_through_the_project_reader(headers: dict[str, pydicom.Dataset]) -> None:
    readers = pytest.importorskip("modality.readers")
    for path in _one_per_series(headers):
        site = Path(path).parents[3].name
        slices = readers.read_slices(InputItem(path=path, dataset=site, kind="dicom"))
        assert len(slices) == 1
        assert np.isfinite(slices[0].pixels).all() and slices[0].pixels.std() > 0, path


def test_ct_lands_in_hounsfield_units_at_every_site(headers: dict[str, pydicom.Dataset]) -> None:
    """Whatever the storage (signed, unsigned, 12-bit, slope 0.5), the modality LUT gives back HU.

    Checked on the middle slice of every CT series: air around the patient, soft tissue, and bone.
    """
    series: dict[str, list[str]] = defaultdict(list)
    for path, ds in sorted(headers.items()):
        if ds.Modality == "CT":
            series[ds.SeriesInstanceUID].append(path)
    sites = set()
    for paths in series.values():
        ds = pydicom.dcmread(paths[len(paths) // 2])
        site = Path(paths[0]).parents[3].name
        sites.add(site)
        hu = apply_modality_lut(ds.pixel_array, ds)
        inside = hu[hu > -1500]  # padding outside the reconstruction circle is far below air
        assert np.percentile(inside, 1) == pytest.approx(-1000, abs=60), site  # air around the patient
        soft = hu[(hu > -50) & (hu < 300)]
        assert soft.size > 0.05 * hu.size and 20 <= np.median(soft) <= 90, site  # soft tissue near 40 HU
        assert hu.max() > 500, site  # bone
    assert sites == set(demo.SPLIT)


def test_radiographs_show_bone_bright_after_photometric_handling(tmp_path: Path) -> None:
    """In a frontal chest film the spine (centre) is brighter than the lungs, MONOCHROME1 or not."""
    seen = set()
    for site in ("site_a", "site_f"):  # CR MONOCHROME1 and CR MONOCHROME2
        task = demo.PatientTask(seed=0, site=site, cls="XR", index=0, body_part="chest", patient_id="T1")
        assert demo.write_patient(task, tmp_path) == 2
        pa = next(p for p in (tmp_path / site).rglob("IM00001*") if p.is_file())
        ds = pydicom.dcmread(pa)
        assert ds.ViewPosition == "PA"
        pixels = ds.pixel_array.astype(np.float32)
        if ds.PhotometricInterpretation == "MONOCHROME1":
            pixels = pixels.max() - pixels
        rows, cols = pixels.shape
        band = pixels[int(rows * 0.35) : int(rows * 0.6)]
        spine = np.median(band[:, int(cols * 0.48) : int(cols * 0.52)])
        lungs = np.median(
            np.hstack(
                [band[:, int(cols * 0.28) : int(cols * 0.33)], band[:, int(cols * 0.67) : int(cols * 0.72)]]
            )
        )
        assert spine > lungs * 1.2, site
        seen.add(ds.PhotometricInterpretation)
    assert seen == {"MONOCHROME1", "MONOCHROME2"}


def test_series_structure_and_unique_ids(headers: dict[str, pydicom.Dataset]) -> None:
    sop_uids = [ds.SOPInstanceUID for ds in headers.values()]
    assert len(set(sop_uids)) == len(sop_uids)
    patient_sites: dict[str, set[str]] = defaultdict(set)
    series: dict[str, list[pydicom.Dataset]] = defaultdict(list)
    for path, ds in headers.items():
        patient_sites[ds.PatientID].add(Path(path).parents[3].name)
        series[ds.SeriesInstanceUID].append(ds)
    assert all(len(sites) == 1 for sites in patient_sites.values())  # no patient in two sites
    for members in series.values():
        assert len({ds.StudyInstanceUID for ds in members}) == 1
        assert sorted(int(ds.InstanceNumber) for ds in members) == list(range(1, len(members) + 1))
        if members[0].Modality in ("CT", "MR", "PT"):
            assert 12 <= len(members) <= 24
            locations = {float(ds.SliceLocation) for ds in members}
            assert len(locations) == len(members)
            assert all(len(ds.PixelSpacing) == 2 and len(ds.ImagePositionPatient) == 3 for ds in members)


def test_every_split_has_every_class_with_two_body_parts(headers: dict[str, pydicom.Dataset]) -> None:
    config = OmegaConf.load(CONFIG_DIR / "dataset" / "demo.yaml")
    assert dict(config.split) == demo.SPLIT
    assert config.sources[0]["_target_"] == "modality.demo.generator.DemoSource"
    body_parts: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for path, ds in headers.items():
        split = demo.SPLIT[Path(path).parents[3].name]
        cls = {"CR": "XR", "DX": "XR", "MG": "XR"}.get(ds.Modality, ds.Modality)
        body_parts[split][cls].add(ds.SeriesDescription.split(" ", 1)[1])
    for split in ("train", "val", "test"):
        assert set(body_parts[split]) == {"CT", "MR", "PT", "XR"}, split
        assert all(len(parts) >= 2 for parts in body_parts[split].values()), (split, body_parts[split])


def test_full_scale_classes_are_roughly_balanced_per_site() -> None:
    """At scale 1 each class gets about the same number of slices per site (by construction)."""
    expected_images = {"CT": 20, "MR": 2 * 15, "PT": 20, "XR": 2}
    per_class = {cls: demo.patients_per_class(cls, 1.0) * n for cls, n in expected_images.items()}
    assert max(per_class.values()) / min(per_class.values()) < 1.2


# ---------------------------------------------------------------------------------------------------
# Determinism and crash safety
# ---------------------------------------------------------------------------------------------------


def test_same_seed_gives_identical_bytes_whatever_the_workers(demo_root: Path, tmp_path: Path) -> None:
    again = demo.generate_demo(tmp_path / "dicom", seed=0, scale=SCALE, sites=["site_c", "site_d"], workers=1)
    files = sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file() and p.suffix != ".json")
    assert len(files) > 100
    for rel in files:
        assert (again / rel).read_bytes() == (demo_root / rel).read_bytes(), rel
    other = demo.generate_demo(tmp_path / "other", seed=1, scale=SCALE, sites=["site_c"], workers=1)
    rel = next(r for r in files if r.parts[0] == "site_c")
    assert pydicom.dcmread(other / rel).SOPInstanceUID != pydicom.dcmread(demo_root / rel).SOPInstanceUID


def test_killed_generation_is_never_read_as_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "dicom"
    real_write = demo.write_patient
    calls = {"n": 0}

    def dies_midway(task: demo.PatientTask, out: Path) -> int:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("simulated kill")
        return real_write(task, out)

    monkeypatch.setattr(demo, "write_patient", dies_midway)
    monkeypatch.setattr(demo, "_default_workers", lambda: 1)  # the patched writer lives in this process
    with pytest.raises(KeyboardInterrupt):
        demo.DemoSource(root, seed=0, scale=SCALE).items()
    assert not (root / demo.MARKER).exists()
    assert not root.exists()  # the half-written tree stays in the staging folder
    monkeypatch.setattr(demo, "write_patient", real_write)

    demo.generate_demo(root, seed=0, scale=SCALE, sites=["site_f"], workers=1)
    assert (root / demo.MARKER).is_file()
    assert not (tmp_path / ".dicom.partial").exists()
    # A one-site tree is complete for what it was asked, but not the demo DemoSource wants.
    assert not demo._marker_matches(root, 0, SCALE)

    # Killed after the rename but before the marker: the tree is there, the marker is not.
    (root / demo.MARKER).unlink()
    (root / "GENERATING.json").write_text("{}")
    assert not demo._marker_matches(root, 0, SCALE)
    demo.generate_demo(root, seed=0, scale=SCALE, sites=["site_f"], workers=1)  # replaces it
    assert (root / demo.MARKER).is_file()


def test_refuses_to_overwrite_a_folder_that_is_not_a_demo(tmp_path: Path) -> None:
    root = tmp_path / "precious"
    root.mkdir()
    (root / "scan.dcm").write_bytes(b"not ours")
    with pytest.raises(RuntimeError, match="refusing to overwrite"):
        demo.generate_demo(root, seed=0, scale=SCALE, sites=["site_f"], workers=1)
    assert (root / "scan.dcm").read_bytes() == b"not ours"

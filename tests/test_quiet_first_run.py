"""A first run a person can read: generating the demo logs none of its libraries' per-file chatter
(openjpeg's "tile number 1 / 1" per JPEG 2000 frame, pydicom's "Invalid value for VR CS" per mixed-case
BodyPartExamined, which the demo writes on purpose), and the demo keeps writing those spellings."""

from __future__ import annotations

import logging
from pathlib import Path

import pydicom
import pytest

from modality.demo import generator as demo


def test_demo_generation_is_quiet_and_keeps_its_quirks(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # as verbose as a Hydra app's INFO root logger, and more
    levels = {name: logging.getLogger(name).level for name in ("pydicom", "openjpeg")}
    root = demo.generate_demo(tmp_path / "dicom", seed=0, scale=0.05, sites=["site_b", "site_d"], workers=1)
    chatter = [r for r in caplog.records if r.name.split(".")[0] in ("pydicom", "openjpeg")]
    assert chatter == [], [f"{r.name}: {r.getMessage()}" for r in chatter[:5]]

    files = [p for p in sorted(root.rglob("*")) if p.is_file() and p.suffix != ".json"]
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
    syntaxes = {str(ds.file_meta.TransferSyntaxUID.name) for ds in headers}
    assert "JPEG 2000 Image Compression (Lossless Only)" in syntaxes  # site_d's encoder ran
    assert "Thorax" in {ds.get("BodyPartExamined") for ds in headers}  # still the invalid CS spelling
    assert {name: logging.getLogger(name).level for name in levels} == levels  # left as they were found

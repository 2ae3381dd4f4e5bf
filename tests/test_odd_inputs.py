"""Input folders as users really have them: file names that are not UTF-8, symlink loops, dangling links,
links to folders, FIFOs, sockets and unreadable folders. Prepare and ``eval.py input=`` must write or
reject every one of them with a reason, never crash, never drop one silently and never hang on a FIFO."""

from __future__ import annotations

import csv
import io
import json
import os
import socket
import tarfile
from pathlib import Path

import pytest
import torch
from prepare_helpers import write_dicom

from modality.evaluation.predict import list_input_files, predict_files
from modality.labels import BodyPartMap, ClassMap
from modality.shards.build import BuildSettings, build_shards
from modality.sources.folders import DicomFolderSource, ImageFolderSource, printable, walk_folder

CLASSES = ["CT", "MR", "PT", "XR"]
PREPROCESS = {
    "image_size": 32,
    "aspect": "pad",
    "scaling": {"method": "percentile", "low": 0.5, "high": 99.5},
    "colour": "grey",
}


def settings(out_dir: Path, split: dict[str, str], workers: int = 0) -> BuildSettings:
    return BuildSettings(
        out_dir=out_dir,
        split_of=split,
        class_map=ClassMap.default(),
        body_part_map=BodyPartMap.default(),
        preprocess=PREPROCESS,
        caps={"CT": 1000, "MR": 1000},
        workers=workers,
        shard_max_samples=50,
        progress=False,
        charts=False,
    )


def bytes_path(folder: Path, name: bytes) -> bytes:
    return os.fsencode(folder) + b"/" + name


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:  # strict UTF-8: fails on a lone surrogate
        return list(csv.DictReader(handle))


def shard_sources(out_dir: Path) -> set[str]:
    sources = set()
    for shard in (out_dir / "shards").glob("*.tar"):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    sources.add(json.loads(tar.extractfile(member).read().decode("utf-8"))["source_path"])
    return sources


class TinyClassifier(torch.nn.Module):
    """A stand-in for a trained checkpoint: prediction only needs images in, logits out."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(1, len(CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.mean(dim=(1, 2, 3)).unsqueeze(1))


DATA_INFO = {
    "classes": CLASSES,
    "preprocess": PREPROCESS,
    "normalize": "minus_one_one",
    "mean01": 0.5,
    "std01": 0.25,
    "input_size": 32,
}


def predict(target: Path, out: Path) -> dict[str, list[dict[str, str]]]:
    predict_files(TinyClassifier(), DATA_INFO, target, out, batch_size=4, progress=False)
    return {name: read_csv(out / f"{name}.csv") for name in ("predictions", "series_votes", "unreadable")}


# ---------------------------------------------------------------- names that are not UTF-8


def test_printable_keeps_valid_text_and_escapes_odd_bytes() -> None:
    assert printable("/data/Thorax é 01.dcm") == "/data/Thorax é 01.dcm"
    assert printable(os.fsdecode(b"/data/bad\xff.dcm")) == "/data/bad\\xff.dcm"
    assert printable(b"/data/bad\xfe\xff") == "/data/bad\\xfe\\xff"
    assert printable("lone \ud800 surrogate") == "lone \\ud800 surrogate"


@pytest.fixture
def odd_named_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "site_a"
    write_dicom(folder / "P1" / "good.dcm", patient_id="P1", seed=1)
    good = write_dicom(folder / "P2" / "tmp.dcm", patient_id="P2", seed=2)
    os.rename(good, bytes_path(folder / "P2", b"bad\xff.dcm"))  # a valid DICOM under a Latin-1 name
    Path(os.fsdecode(bytes_path(folder, b"junk\xfe.dcm"))).write_bytes(b"not a DICOM file at all")
    return folder


def test_prepare_writes_or_rejects_files_whose_names_are_not_utf8(
    odd_named_folder: Path, tmp_path: Path
) -> None:
    items = DicomFolderSource(odd_named_folder, "site_a").items()
    assert len(items) == 3
    out = tmp_path / "out"
    build_shards(items, settings(out, {"site_a": "train"}, workers=2))

    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["inputs"]["files"] == 3
    assert summary["inputs"]["written_files"] == 2 and summary["inputs"]["rejected_files"] == 1
    assert shard_sources(out) == {
        str(odd_named_folder / "P1" / "good.dcm"),
        f"{odd_named_folder}/P2/bad\\xff.dcm",
    }
    rejects = read_csv(out / "rejects.csv")
    assert [(r["path"], r["reason"]) for r in rejects] == [
        (f"{odd_named_folder}/junk\\xfe.dcm", "not a DICOM file")
    ]


def test_prediction_writes_or_lists_files_whose_names_are_not_utf8(
    odd_named_folder: Path, tmp_path: Path
) -> None:
    tables = predict(odd_named_folder, tmp_path / "eval")
    assert {r["path"] for r in tables["predictions"]} == {
        str(odd_named_folder / "P1" / "good.dcm"),
        f"{odd_named_folder}/P2/bad\\xff.dcm",
    }
    assert [(r["path"], r["reason"]) for r in tables["unreadable"]] == [
        (f"{odd_named_folder}/junk\\xfe.dcm", "not a DICOM file")
    ]
    assert len(tables["series_votes"]) == 2
    assert not list((tmp_path / "eval").glob(".*.tmp"))


# ---------------------------------------------------------------- paths that are not regular files


@pytest.fixture
def hostile_folder(tmp_path: Path) -> Path:
    """One good DICOM file, and one of each kind of path that is not a regular file."""
    folder = tmp_path / "site_a"
    write_dicom(folder / "P1" / "good.dcm", patient_id="P1", seed=1)
    (folder / "loop.dcm").symlink_to("loop.dcm")
    (folder / "a.dcm").symlink_to("b.dcm")
    (folder / "b.dcm").symlink_to("a.dcm")
    (folder / "dangling.dcm").symlink_to("nowhere.dcm")
    (folder / "linked_file.dcm").symlink_to(folder / "P1" / "good.dcm")
    (folder / "up").symlink_to("..")
    (folder / "P1" / "parent").symlink_to(folder)
    other = tmp_path / "elsewhere"
    other.mkdir()
    (folder / "other_folder").symlink_to(other)
    os.mkfifo(folder / "pipe.dcm")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(folder / "sock.dcm"))
    server.close()
    (folder / ".hidden").mkdir()  # hidden names stay out by design
    (folder / ".hidden" / "x.dcm").write_bytes(b"")
    return folder


EXPECTED_REASONS = {
    "a.dcm": "symlink loop",
    "b.dcm": "symlink loop",
    "dangling.dcm": "dangling symlink",
    "loop.dcm": "symlink loop",
    "other_folder": "symlink to a folder (not followed)",
    "P1/parent": "symlink loop",
    "pipe.dcm": "not a regular file (FIFO)",
    "sock.dcm": "not a regular file (socket)",
    "up": "symlink loop",
}


@pytest.mark.timeout(120)  # opening the FIFO would block for ever
def test_walk_accounts_for_every_path(hostile_folder: Path) -> None:
    entries = list(walk_folder(hostile_folder))
    rel = {e.path.relative_to(hostile_folder).as_posix(): e for e in entries}
    assert {k: e.reason for k, e in rel.items() if e.reason} == EXPECTED_REASONS
    assert sorted(k for k, e in rel.items() if e.reason is None) == ["P1/good.dcm", "linked_file.dcm"]
    assert rel["dangling.dcm"].detail == "-> nowhere.dcm does not exist"


@pytest.mark.timeout(120)
def test_prepare_rejects_every_path_that_is_not_a_regular_file(hostile_folder: Path, tmp_path: Path) -> None:
    items = DicomFolderSource(hostile_folder, "site_a").items()
    out = tmp_path / "out"
    build_shards(items, settings(out, {"site_a": "train"}))
    rejects = {
        Path(r["path"]).relative_to(hostile_folder).as_posix(): r for r in read_csv(out / "rejects.csv")
    }
    # linked_file.dcm is the same image as good.dcm: written once, the copy rejected as a duplicate.
    assert rejects.pop("linked_file.dcm")["reason"] == "duplicate image"
    assert {k: r["reason"] for k, r in rejects.items()} == EXPECTED_REASONS
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["inputs"]["files"] == len(EXPECTED_REASONS) + 2
    assert summary["inputs"]["written_files"] == 1


@pytest.mark.timeout(120)
def test_image_folder_source_lists_problem_paths_too(tmp_path: Path) -> None:
    folder = tmp_path / "xr"
    folder.mkdir()
    os.mkfifo(folder / "pipe.png")
    (folder / "dangling.png").symlink_to("gone.png")
    (folder / "dangling.txt").symlink_to("gone.txt")  # not an image name: not this source's business
    items = ImageFolderSource(folder, "xr", label="XR").items()
    assert {(Path(i.path).name, i.extra["rejected"]["reason"]) for i in items} == {
        ("pipe.png", "not a regular file (FIFO)"),
        ("dangling.png", "dangling symlink"),
    }


@pytest.mark.timeout(120)
def test_prediction_lists_every_path_that_is_not_a_regular_file(hostile_folder: Path, tmp_path: Path) -> None:
    tables = predict(hostile_folder, tmp_path / "eval")
    unreadable = {
        Path(r["path"]).relative_to(hostile_folder).as_posix(): r["reason"] for r in tables["unreadable"]
    }
    assert unreadable == EXPECTED_REASONS
    predicted = {Path(r["path"]).relative_to(hostile_folder).as_posix() for r in tables["predictions"]}
    assert predicted == {"P1/good.dcm", "linked_file.dcm"}


@pytest.mark.timeout(120)
def test_a_fifo_given_as_input_is_named_for_what_it_is(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")
    files, problems = list_input_files(tmp_path / "pipe")
    assert files == [] and [(p.path.name, p.reason) for p in problems] == [
        ("pipe", "not a regular file (FIFO)")
    ]
    tables = predict(tmp_path / "pipe", tmp_path / "eval")
    assert [r["reason"] for r in tables["unreadable"]] == ["not a regular file (FIFO)"]
    with pytest.raises(FileNotFoundError, match="input does not exist"):
        list_input_files(tmp_path / "missing")


def test_an_unreadable_folder_is_listed_not_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Permission denied as a non-root user meets it (the test may run as root, who reads everything)."""
    folder = tmp_path / "site_a"
    write_dicom(folder / "P1" / "good.dcm", patient_id="P1", seed=1)
    (folder / "locked").mkdir()
    real_scandir = os.scandir

    def scandir(path):
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    entries = [(e.path.name, e.reason, e.detail) for e in walk_folder(folder) if e.reason]
    assert entries == [("locked", "unreadable folder", "Permission denied")]
    tables = predict(folder, tmp_path / "eval")
    assert [(Path(r["path"]).name, r["reason"]) for r in tables["unreadable"]] == [
        ("locked", "unreadable folder")
    ]
    items = DicomFolderSource(folder, "site_a").items()
    assert [i.extra["rejected"]["reason"] for i in items if i.extra] == ["unreadable folder"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads folders whatever their permissions")
def test_a_folder_without_read_permission_is_listed(tmp_path: Path) -> None:
    folder = tmp_path / "site_a"
    (folder / "locked").mkdir(parents=True)
    (folder / "locked").chmod(0)
    try:
        entries = [(e.path.name, e.reason) for e in walk_folder(folder) if e.reason]
    finally:
        (folder / "locked").chmod(0o755)
    assert entries == [("locked", "unreadable folder")]


# ---------------------------------------------------------------- progress on a terminal only


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_prediction_shows_a_bar_on_a_terminal_and_none_in_a_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "site_a"
    for i in range(3):
        write_dicom(folder / f"im{i}.dcm", patient_id=f"P{i}", seed=i)
    terminal = FakeTerminal()
    monkeypatch.setattr("sys.stderr", terminal)
    predict_files(TinyClassifier(), DATA_INFO, folder, tmp_path / "tty", progress=True)
    assert "predict: 100%" in terminal.getvalue() and "3/3" in terminal.getvalue()

    log = io.StringIO()  # not a TTY: a redirected log
    monkeypatch.setattr("sys.stderr", log)
    predict_files(TinyClassifier(), DATA_INFO, folder, tmp_path / "log", progress=True)
    assert log.getvalue() == ""


def test_prepare_shows_no_bar_for_a_pass_with_nothing_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    from modality.shards.build import parallel_map

    terminal = FakeTerminal()
    monkeypatch.setattr("sys.stderr", terminal)
    assert list(parallel_map(lambda batch: batch, [], 0, "decode", True)) == []
    assert terminal.getvalue() == ""
    assert list(parallel_map(lambda batch: batch, [1, 2, 3], 0, "decode", True)) == [1, 2, 3]
    assert "decode: 100%" in terminal.getvalue()
    log = io.StringIO()
    monkeypatch.setattr("sys.stderr", log)
    assert list(parallel_map(lambda batch: batch, [1, 2, 3], 0, "decode", True)) == [1, 2, 3]
    assert log.getvalue() == ""

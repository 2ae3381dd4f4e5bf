"""Labels a curator gives a pool, matched to the files ``eval.py input=<folder>`` reads.

Three ways to say what a file should be (``labels=`` in ``configs/eval.yaml``):

- ``labels=<file.csv>``: columns ``path`` (absolute, or relative to the input folder) and ``label``;
- ``labels=folder``: a file's parent folder name is its label (image datasets on the web are laid out so);
- ``labels=header``: the DICOM Modality tags alone.

In every mode a DICOM file's Modality tag (through the checkpoint's class map) labels the file when no
explicit label does: archives are audited against their own headers too. A label names a model class
case-insensitively (``mr`` -> MR) or a DICOM Modality code the checkpoint's class map knows (``CR`` -> XR,
the same rule prepare's :func:`modality.labels.class_map.resolve_class` applies); ``other`` or a DICOM code
that is none of the classes (``US``, ``NM``, ``XA``...) labels the file ``other``, which only a header can
decide (eval answers such files ``other`` from their Modality tag); anything else (``MRI``, ``glioma``) is
reported as an unknown label, never guessed. Every label and every file is accounted
for: a label that matches no input file, a file that no label reaches, a label that is unknown, two labels
that contradict each other for one file, a label on a file that could not be predicted: each is one row of
``label_problems.csv``.

Paths are compared after :func:`os.path.abspath` and :func:`os.path.normpath`, never after resolving links:
a pool of symlinks is labelled by the names the curator sees, which are the names ``predictions.csv`` lists.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from modality.labels import ClassMap
from modality.labels.class_map import OTHER

#: ``labels=`` values that are no CSV file.
LABEL_MODES = ("folder", "header")
PROBLEM_COLUMNS = ("path", "problem", "label", "detail")
NO_FILE = "label without a file"
NO_LABEL = "file without a label"
UNKNOWN_LABEL = "unknown label"
CONTRADICTING = "contradicting labels for one file"
NOT_PREDICTED = "labelled file not predicted"


@dataclass(frozen=True)
class GivenLabel:
    """The class a file is said to be, and who says so."""

    label: str  # one of the model's classes
    source: str  # "csv", "folder" or "header"
    raw: str  # as written (the CSV cell, the folder name, the Modality code)


@dataclass
class LabelAssignment:
    """Labels per input file (keyed by the path string the prediction tables use) and what did not fit."""

    by_file: dict[str, GivenLabel] = field(default_factory=dict)
    problems: list[dict[str, str]] = field(default_factory=list)

    def problem(self, path: str, problem: str, label: str = "", detail: str = "") -> None:
        self.problems.append({"path": path, "problem": problem, "label": label, "detail": detail})


def label_to_class(raw: str, classes: Sequence[str], class_map: ClassMap) -> str | None:
    """A model class for a written label: a class name in any case, or a Modality code of the class map;
    ``other`` for ``other`` itself or a DICOM Modality code that is none of the classes (``US``, ``NM``: the
    decision eval gives such files from their header, :meth:`ClassMap.names_other`)."""
    text = raw.strip()
    by_lower = {c.lower(): c for c in classes}
    if text.lower() in by_lower:
        return by_lower[text.lower()]
    if text.lower() == OTHER or class_map.names_other(text):
        return OTHER
    mapped = class_map.class_of(text) if text else None
    return mapped if mapped in classes else None


def normalised_path(path: str | os.PathLike[str]) -> str:
    """Absolute and normalised, links left alone (see the module docstring)."""
    return os.path.normpath(os.path.abspath(os.fspath(path)))


def resolve_label_path(raw: str, root: Path) -> str:
    """The file a CSV ``path`` cell names: absolute as written, else relative to the input folder."""
    text = raw.strip()
    return normalised_path(text if os.path.isabs(text) else root / text)


def read_label_table(path: Path) -> list[tuple[str, str]]:
    """``(path, label)`` rows of a labels CSV (a UTF-8 BOM is fine; blank rows are skipped).

    Raises ``ValueError`` naming the missing columns: a wrong file must stop the run before the model
    spends an hour on a pool whose report would then be empty."""
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in ("path", "label") if c not in columns]
        if missing:
            raise ValueError(f"labels file {path} lacks column(s) {missing}; it has {columns}")
        reader.fieldnames = columns
        return [
            (str(row["path"] or ""), str(row["label"] or ""))
            for row in reader
            if (row["path"] or "").strip() or (row["label"] or "").strip()
        ]


def companion_targets(paths: Iterable[str]) -> dict[str, str]:
    """Analyze ``.hdr`` -> its ``.img`` for every pair among ``paths``: a label on the header labels the volume."""
    known = {normalised_path(p): p for p in paths}
    pairs = {}
    for key, original in known.items():
        if key.lower().endswith(".hdr"):
            image = key[:-4] + ".img"  # the pairing predict's reader uses (Path.with_suffix(".img"))
            if image in known:
                pairs[original] = known[image]
    return pairs


def explicit_labels(
    spec: str,
    root: Path,
    files: Sequence[str],
    classes: Sequence[str],
    class_map: ClassMap,
) -> LabelAssignment:
    """Labels from a CSV or the folder rule for ``files`` (every path under the input, readable or not).

    ``labels=header`` gives no explicit label; :func:`complete_with_headers` adds the tags for every mode."""
    assignment = LabelAssignment()
    companions = companion_targets(files)
    if spec == "header":
        return assignment
    if spec == "folder":
        for path in files:
            if path in companions:
                continue  # the .img beside it carries the same folder name
            raw = Path(path).parent.name
            _assign(assignment, path, raw, "folder", classes, class_map)
        return assignment

    index = {normalised_path(p): p for p in files}
    for raw_path, raw_label in read_label_table(Path(spec)):
        key = resolve_label_path(raw_path, root)
        path = index.get(key)
        if path is None:
            # the path looked for, so the problem counts under its source folder; the cell as written beside it
            assignment.problem(key, NO_FILE, raw_label, f"written as {raw_path!r}")
            continue
        _assign(assignment, companions.get(path, path), raw_label, "csv", classes, class_map)
    return assignment


def _assign(
    assignment: LabelAssignment,
    path: str,
    raw: str,
    source: str,
    classes: Sequence[str],
    class_map: ClassMap,
) -> None:
    """One label for one file; unknown labels and contradictions are reported and leave the file unlabelled."""
    cls = label_to_class(raw, classes, class_map)
    if cls is None:
        detail = f"not a class ({', '.join(classes)}) nor a Modality code of the class map"
        assignment.problem(path, UNKNOWN_LABEL, raw, detail)
        if path not in assignment.by_file:  # recorded as given-but-unusable: not also "without a label"
            assignment.by_file[path] = GivenLabel("", source, raw)
        return
    earlier = assignment.by_file.get(path)
    if earlier is not None and earlier.label and earlier.label != cls:
        # Neither is guessed right: the file stays unlabelled and both labels are listed.
        assignment.problem(path, CONTRADICTING, raw, f"also labelled {earlier.raw!r}")
        assignment.by_file[path] = GivenLabel("", source, f"{earlier.raw} | {raw}")
        return
    if earlier is None:
        assignment.by_file[path] = GivenLabel(cls, source, raw)
    # an earlier unusable label (unknown, contradicted) stays unusable: it is listed already


def complete_with_headers(
    assignment: LabelAssignment,
    predicted_header_classes: Mapping[str, str],
    unreadable: Iterable[str],
) -> dict[str, GivenLabel]:
    """The final label of every predicted file, and the problems of files and labels left over.

    ``predicted_header_classes``: every predicted file -> the class its DICOM Modality tag maps to ("" when
    none). A file without an explicit label takes its header class; a predicted file with neither is listed
    as a file without a label; an explicit label on a file the readers rejected is listed too (its reason
    is in unreadable.csv)."""
    final: dict[str, GivenLabel] = {}
    for path, header_class in predicted_header_classes.items():
        given = assignment.by_file.get(path)
        if given is not None and given.label:
            final[path] = given
        elif header_class:
            final[path] = GivenLabel(header_class, "header", header_class)
        elif given is None:
            assignment.problem(path, NO_LABEL)
        # a contradicted or unknown label is already listed with its reason
    for path in sorted(set(unreadable)):
        given = assignment.by_file.get(path)
        if given is not None and given.label:
            assignment.problem(path, NOT_PREDICTED, given.raw, "see unreadable.csv")
    return final

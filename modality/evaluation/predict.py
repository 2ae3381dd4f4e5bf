"""Raw-file prediction with a header check: ``python eval.py ckpt_path=<ckpt> input=<file or folder>``.

Every file under ``input`` (walked recursively, sorted, hidden files skipped) goes through the project's
own readers and the *checkpoint's* preprocessing: ``data_info.preprocess`` (copied from the training data's
summary.json into the checkpoint), read once per run as :class:`modality.intensity.pipeline.Preprocess`,
through :func:`modality.intensity.pipeline.slice_to_uint8`, then the training normalisation
(:func:`modality.data.batch_transforms.model_inputs`: ``data_info.normalize``, ``mean01``, ``std01``,
``input_size``, ``equalize``). Nothing is re-typed, so a model trained on 64 px percentile-scaled slices is
fed 64 px percentile-scaled slices.

Outputs in ``out``:

- ``predictions.csv``: one row per predicted frame/slice with class probabilities, the DICOM header's
  Modality and BodyPartExamined (normalised region too), the class the header implies through the
  checkpoint's class map, and ``header_mismatch`` = the header class is known (the code maps to one of the
  model's classes) AND differs from the prediction AND the prediction's probability is at least
  ``mismatch_threshold`` (0.9 by default). Unknown header classes (US, SC, missing tag, PNG files) never flag.
- ``series_votes.csv``: the decision to act on, one per series: DICOM files sharing a SeriesInstanceUID;
  every other file is its own series (a NIfTI/Analyze volume, an npy array, a PNG/JPEG image, a DICOM file
  without the UID); ``series_from`` says which. The majority vote over its slices, the vote share, the
  slice count, ``confidence`` (``mean_probability``, the mean probability of the voted class, through the
  calibration's ``series_confidence`` map when crossval fitted one, the same map as the slices': then it
  is the chance the vote is right measured on held-out sources), the mean
  probability of every class, a series-level ``header_mismatch`` (header class known, differs from the
  vote, and the vote's mean probability >= the threshold), the source folder and the middle slice.
- With a body-part head (``model.body_part=true``): per slice ``region_predicted``, ``region_probability``,
  ``region_prob_<region>``, ``header_region`` (the head region BodyPartExamined names: empty without a DICOM
  header or tag, ``unknown`` for a value the table does not map) and ``region_mismatch`` (header region known,
  differs, probability >= the threshold); per series ``region_voted`` (majority vote), ``region_vote_share``,
  ``region_mean_probability``, ``header_region``, ``region_mismatch`` and ``region_check``: ``missing`` (a
  DICOM series whose BodyPartExamined names no region: the prediction fills a gap), ``contradicts`` (as
  ``region_mismatch``), ``collection_wide`` (its source puts one BodyPartExamined value on every one of its 2+
  series, so the tag may be a collection default; contradictions there say ``contradicts``), ``agrees``, or
  empty (no DICOM header); ``header_region_collection_wide`` marks those series. prediction_summary.json
  counts them (``region_check``) and names each collection-wide source with its value.
- ``decision`` (per slice and per series) is what to act on, and ``decision_from`` says what made it:
  ``header`` (the DICOM Modality tag names a modality that is none of the model's classes, US, NM, XA, OT,
  SC...: the answer is ``other``), ``threshold`` (the calibrated confidence is below the "unknown" threshold
  that crossval fitted on held-out sources: ``unknown``), or ``pixels`` (the model's answer). A series takes
  ``other`` when most of its slices do.
- ``unreadable.csv``: ``path, frame, reason, detail`` for files the readers reject or that are no supported
  kind, and for blank slices (prepare never trains on them, so the model has nothing to say about them).
- ``prediction_summary.json``: the counts the console prints (series first), and per source folder (the
  first path component under ``input``).
- With ``labels=`` (a CSV, ``folder`` or ``header``): ``mislabels.csv``, ``label_problems.csv`` and
  ``mislabels.html``, the mislabel report of :mod:`modality.evaluation.mislabels`.
"""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modality.evaluation.checkpoint import (
    find_calibration,
    load_classifier,
    resolve_checkpoint,
    stored_label_maps,
)
from modality.evaluation.given_labels import (
    LABEL_MODES,
    NO_FILE,
    NO_LABEL,
    PROBLEM_COLUMNS,
    UNKNOWN_LABEL,
    complete_with_headers,
    explicit_labels,
    read_label_table,
)
from modality.evaluation.mislabels import (
    MISLABEL_COLUMNS,
    label_units,
    middle_slice,
    rank_mislabels,
    render_mislabel_page,
    source_of,
    source_summary,
    thumbnail_png,
)
from modality.evaluation.writers import output_folder, write_csv, write_text
from modality.intensity.pipeline import Preprocess
from modality.labels import BodyPartMap, ClassMap
from modality.labels.class_map import OTHER
from modality.metrics.calibration import ConfidenceMap
from modality.metrics.calibration import vote as vote_series
from modality.models.fusion import FusionCalibration
from modality.models.value_head import DEFAULT_CNN_WEIGHT, check_fusion, combine_with_values
from modality.readers.raw_volume import DETACHED_DATA_SUFFIXES
from modality.records import InputItem, RejectedInput, SliceHeader
from modality.sources.folders import FolderEntry, classify_path, kind_of_path, printable, walk_folder

PREDICTION_COLUMNS = (
    "path",
    "frame",
    "n_frames",
    "series",
    "predicted",
    "probability",
)
#: unreadable.csv reason of an Analyze ``.hdr`` whose ``.img`` is predicted: accounted for, not a failure.
ANALYZE_HEADER = "Analyze header"
#: unreadable.csv reason of a ``.raw``/``.zraw`` beside a MetaImage ``.mhd`` or NRRD ``.nhdr`` of the same stem.
VOLUME_DATA = "volume data file"
#: Reasons of files read through another file (accounted for, not failures): summary's ``companion_files``.
COMPANION_REASONS = (ANALYZE_HEADER, VOLUME_DATA)
HEADER_COLUMNS = ("header_modality", "header_class", "header_body_part", "body_part", "header_mismatch")
#: series_votes.csv ``region_check`` values (the body-part head against BodyPartExamined).
REGION_CHECKS = ("missing", "contradicts", "collection_wide", "agrees")


def list_input_files(target: Path) -> tuple[list[Path], list[FolderEntry]]:
    """``target`` itself, or every non-hidden file below it in sorted order (names with spaces, or not
    UTF-8, are fine); and every path that is no regular file to read, with its reason (a FIFO, a dangling
    or looping symlink, a link to a folder, an unreadable folder), for unreadable.csv. Nothing is opened."""
    if not os.path.lexists(target):
        raise FileNotFoundError(f"input does not exist: {printable(target)}")
    if target.is_dir():  # the input itself may be a link to a folder; links below it are not followed
        found = list(walk_folder(target))
        return [e.path for e in found if e.reason is None], [e for e in found if e.reason is not None]
    entry = classify_path(target)
    return ([target], []) if entry.reason is None else ([], [entry])


@dataclass
class PendingSlice:
    """One slice ready for the model, with what the outputs need to say about it."""

    path: str
    frame: int
    n_frames: int
    series: str
    header_modality: str
    header_class: str
    header_body_part: str
    body_part: str
    image: np.ndarray  # uint8 size x size
    value_features: list[float] | None = None  # modality.intensity.value_stats, for the model's value head
    header_region: str = ""  # the body-part head region the tag names ("" without a tag, "unknown" unmapped)
    header_other: bool = False  # the Modality tag names none of the classes (ClassMap.names_other)


@dataclass
class PredictionRun:
    """Accumulated rows of one prediction pass."""

    classes: list[str]
    threshold: float
    rows: list[dict[str, Any]] = field(default_factory=list)
    unreadable: list[dict[str, Any]] = field(default_factory=list)
    files_seen: int = 0


@dataclass(frozen=True)
class HeaderFacts:
    """What a file's DICOM header says (all empty for files without one)."""

    modality: str  # the Modality code as written
    header_class: str  # the model class the code maps to through the checkpoint's class map, or ""
    body_part_raw: str
    body_part: str  # normalised region
    series: str  # SeriesInstanceUID, or the file path when there is none
    header_region: str = ""  # head region of the tag ("" without one, "unknown" when the table cannot map it)
    header_other: bool = False  # the code names a modality that is none of the classes: the answer is `other`


def header_facts(
    item: InputItem,
    first: SliceHeader,
    class_map: ClassMap,
    body_part_map: BodyPartMap,
    classes: Sequence[str],
) -> HeaderFacts:
    """Header facts from a file's first slice header; only DICOM headers are trusted as header facts."""
    if item.kind != "dicom":
        return HeaderFacts("", "", "", "", item.path)
    modality = (first.modality or "").strip()
    header_class = class_map.class_of(modality) if modality else None
    raw_body_part = (first.body_part_raw or "").strip()
    region = body_part_map.normalise(raw_body_part) if raw_body_part else ""
    return HeaderFacts(
        modality=modality,
        header_class=header_class if header_class in classes else "",
        body_part_raw=raw_body_part,
        body_part=region,
        series=(first.series_uid or "").strip() or item.path,
        header_region=body_part_map.head_region(region) if region else "",
        header_other=class_map.names_other(modality),
    )


def read_file_slices(
    path: Path,
    preprocess: Preprocess,
    class_map: ClassMap,
    body_part_map: BodyPartMap,
    classes: Sequence[str],
) -> tuple[list[PendingSlice], list[dict[str, Any]]]:
    """Read and preprocess every slice of one file; returns (slices, unreadable rows). Never raises for data."""
    from modality.intensity.pipeline import slice_to_uint8
    from modality.intensity.value_stats import value_features
    from modality.models.fusion import has_physical_units
    from modality.readers import read_headers, read_slices

    kind = kind_of_path(path)
    if path.suffix.lower() == ".hdr" and path.with_suffix(".img").exists():
        return [], [
            {"path": str(path), "frame": "", "reason": ANALYZE_HEADER, "detail": "read with its .img"}
        ]
    if path.suffix.lower() in DETACHED_DATA_SUFFIXES:
        headers = [path.with_suffix(s) for s in (".mhd", ".nhdr") if path.with_suffix(s).is_file()]
        if headers:
            return [], [
                {
                    "path": str(path),
                    "frame": "",
                    "reason": VOLUME_DATA,
                    "detail": f"read with {headers[0].name}",
                }
            ]
    if kind is None:
        return [], [
            {"path": str(path), "frame": "", "reason": "unsupported file type", "detail": path.suffix}
        ]
    item = InputItem(path=str(path), dataset="input", kind=kind)
    try:
        headers = read_headers(item)
        if not headers:
            raise RejectedInput("no slices", "the reader found no image in the file")
        facts = header_facts(item, headers[0], class_map, body_part_map, classes)
        decoded_slices = read_slices(item, None, colour=preprocess.colour)
    except RejectedInput as error:
        return [], [{"path": str(path), "frame": "", "reason": error.reason, "detail": error.detail}]
    except Exception as error:  # one odd file must not end a run over a whole archive
        detail = str(error)[:300]
        return [], [
            {
                "path": str(path),
                "frame": "",
                "reason": f"unexpected error: {type(error).__name__}",
                "detail": detail,
            }
        ]

    slices: list[PendingSlice] = []
    rejected: list[dict[str, Any]] = []
    for decoded in decoded_slices:
        pixels = np.asarray(decoded.pixels)
        finite = pixels[np.isfinite(pixels)] if pixels.size else pixels
        if finite.size == 0 or finite.min() == finite.max():
            rejected.append(
                {"path": str(path), "frame": decoded.index, "reason": "blank slice", "detail": ""}
            )
            continue
        try:
            image = slice_to_uint8(decoded, facts.modality or None, preprocess)
        except Exception as error:  # one odd slice is listed, the rest of the run goes on
            reason = (
                error.reason
                if isinstance(error, RejectedInput)
                else f"preprocessing failed: {type(error).__name__}"
            )
            rejected.append(
                {"path": str(path), "frame": decoded.index, "reason": reason, "detail": str(error)[:300]}
            )
            continue
        try:
            # No physical units (PNG/JPEG, colour DICOM): the value head abstains rather than read "8-bit".
            features: list[float] | None = (
                value_features(pixels, decoded.meta.get("stored_peak"))
                if has_physical_units(decoded.meta)
                else None
            )
        except ValueError:
            features = None
        slices.append(
            PendingSlice(
                path=str(path),
                frame=int(decoded.index),
                n_frames=len(headers),
                series=facts.series,
                header_modality=facts.modality,
                header_class=facts.header_class,
                header_body_part=facts.body_part_raw,
                body_part=facts.body_part,
                image=image,
                value_features=features,
                header_region=facts.header_region,
                header_other=facts.header_other,
            )
        )
    return slices, rejected


def predict_heads(
    model: torch.nn.Module, images: Sequence[np.ndarray], data_info: Mapping[str, Any]
) -> tuple[np.ndarray, np.ndarray | None]:
    """Softmax modality probabilities for uint8 slices, normalised exactly as the training batches were,
    and, for a model with a body-part head, region probabilities (one pass)."""
    from modality.data.batch_transforms import model_inputs
    from modality.evaluation.shard_split import forward_heads

    device = next(model.parameters()).device
    batch = torch.from_numpy(np.stack(images)).unsqueeze(1).to(device)
    inputs = model_inputs(batch, data_info)
    with torch.inference_mode():
        logits, region_logits = forward_heads(model, inputs)
    regions = None if region_logits is None else torch.softmax(region_logits.float(), dim=1).cpu().numpy()
    return torch.softmax(logits.float(), dim=1).cpu().numpy(), regions


def prediction_row(
    pending: PendingSlice, probs: np.ndarray, classes: Sequence[str], threshold: float
) -> dict[str, Any]:
    """One predictions.csv row, with the header check."""
    best = int(np.argmax(probs))
    predicted = classes[best]
    mismatch = (
        bool(pending.header_class) and pending.header_class != predicted and float(probs[best]) >= threshold
    )
    row: dict[str, Any] = {
        "path": pending.path,
        "frame": pending.frame,
        "n_frames": pending.n_frames,
        "series": pending.series,
        "predicted": predicted,
        "probability": round(float(probs[best]), 6),
    }
    row.update({f"prob_{c}": round(float(p), 6) for c, p in zip(classes, probs, strict=True)})
    row.update(
        {
            "header_modality": pending.header_modality,
            "header_class": pending.header_class,
            "header_body_part": pending.header_body_part,
            "body_part": pending.body_part,
            "header_mismatch": int(mismatch),
        }
    )
    return row


def region_columns(
    pending: PendingSlice, probs: np.ndarray, regions: Sequence[str], threshold: float
) -> dict[str, Any]:
    """The body-part head's predictions.csv columns for one slice, with its check against the tag."""
    best = int(np.argmax(probs))
    header = pending.header_region
    mismatch = header in regions and header != regions[best] and float(probs[best]) >= threshold
    return {
        "region_predicted": regions[best],
        "region_probability": round(float(probs[best]), 6),
        **{f"region_prob_{r}": round(float(p), 6) for r, p in zip(regions, probs, strict=True)},
        "header_region": header,
        "region_mismatch": int(mismatch),
    }


def region_prediction_columns(regions: Sequence[str]) -> list[str]:
    return [
        "region_predicted",
        "region_probability",
        *[f"region_prob_{r}" for r in regions],
        "header_region",
        "region_mismatch",
    ]


def rows_by_series(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    """predictions.csv rows grouped by their ``series``, in row order."""
    groups: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[str(row["series"])].append(row)
    return groups


def majority_vote(
    members: Sequence[Mapping[str, Any]], names: Sequence[str], prefix: str = ""
) -> tuple[str, float, float, np.ndarray]:
    """``(voted, vote share, its mean probability, mean probability of every name)`` of one series' slices:
    the majority of their ``<prefix>predicted`` answers, ties to the higher mean of ``<prefix>prob_<name>``.
    One rule for the modality vote (``prefix=""``) and the body-part head's (``"region_"``)."""
    probs = np.array([[float(r[f"{prefix}prob_{n}"]) for n in names] for r in members], dtype=np.float64)
    answers = [list(names).index(r[f"{prefix}predicted"]) for r in members]
    voted, share, mean_voted, mean = vote_series(probs, answers)
    return names[voted], share, mean_voted, mean


def region_votes(
    votes: Sequence[dict[str, Any]],
    rows: Sequence[Mapping[str, Any]],
    regions: Sequence[str],
    threshold: float,
) -> dict[str, Any]:
    """Add each series' region vote and its BodyPartExamined check to ``votes`` (in place, needs ``source``);
    returns the counts for prediction_summary.json.

    ``region_check``: ``missing`` (a DICOM series whose tag names no region), ``contradicts`` (the tag's
    region differs from the vote, whose mean probability >= ``threshold``), ``collection_wide`` (not
    contradicted, but its source puts one BodyPartExamined value on each of its 2+ DICOM series with a tag, so
    the value may be a collection default rather than a fact about the series), ``agrees``, or empty for
    files without a DICOM header."""
    groups = rows_by_series(rows)
    raw_by_source: dict[str, set[str]] = defaultdict(set)
    tagged_by_source: Counter[str] = Counter()
    for vote in votes:
        members = groups[str(vote["series"])]
        voted, share, mean_voted, _ = majority_vote(members, regions, "region_")
        header = Counter(str(r["header_region"]) for r in members).most_common(1)[0][0]
        raw = Counter(str(r["header_body_part"]) for r in members).most_common(1)[0][0]
        vote.update(
            {
                "region_voted": voted,
                "region_vote_share": round(share, 6),
                "region_mean_probability": round(mean_voted, 6),
                "header_region": header,
                "region_mismatch": int(header in regions and header != voted and mean_voted >= threshold),
            }
        )
        vote["_raw_body_part"] = raw
        if vote["header_modality"] and raw:
            raw_by_source[str(vote["source"])].add(raw.upper())
            tagged_by_source[str(vote["source"])] += 1
    collection_wide = {
        source: next(iter(values))
        for source, values in raw_by_source.items()
        if len(values) == 1 and tagged_by_source[source] >= 2
    }
    for vote in votes:
        raw = vote.pop("_raw_body_part")
        wide = bool(vote["header_modality"] and raw and str(vote["source"]) in collection_wide)
        vote["header_region_collection_wide"] = int(wide)
        if not vote["header_modality"]:
            check = ""
        elif vote["header_region"] not in regions:
            check = "missing"
        elif vote["region_mismatch"]:
            check = "contradicts"
        else:
            check = "collection_wide" if wide else "agrees"
        vote["region_check"] = check
    return {
        "series_by_region": dict(Counter(str(v["region_voted"]) for v in votes)),
        "checks": {name: sum(v["region_check"] == name for v in votes) for name in REGION_CHECKS},
        "slice_mismatches": sum(int(r["region_mismatch"]) for r in rows),
        "collection_wide_sources": {
            printable(source): {
                "value": value,
                "series": tagged_by_source[source],
                "contradicted": sum(
                    v["region_mismatch"] for v in votes if v["source"] == source and v["header_modality"]
                ),
            }
            for source, value in sorted(collection_wide.items())
        },
    }


def series_votes(
    rows: Sequence[Mapping[str, Any]],
    classes: Sequence[str],
    threshold: float,
    unknown_below: float | None = None,
    confidence_map: ConfidenceMap | None = None,
) -> list[dict[str, Any]]:
    """Majority vote per series (ties go to the higher mean probability), mean probabilities, and the check.

    ``confidence`` is the vote's mean probability through ``confidence_map`` (the calibration's
    ``series_confidence``, fitted on held-out sources by crossval: since 2026-12-06 the slice map; older
    calibration files may carry a slice-count term, which is still applied; None: the mean
    probability as it is). ``decision`` is the vote, or ``unknown`` where that confidence is below
    ``unknown_below`` (the calibration's ``unknown_below_series``; None: always the vote)."""
    mapping = confidence_map or ConfidenceMap()
    table = []
    for series, members in sorted(rows_by_series(rows).items()):
        voted, share, mean_voted, mean = majority_vote(members, classes)
        header_class = Counter(r["header_class"] for r in members).most_common(1)[0][0]
        header_modality = Counter(r["header_modality"] for r in members).most_common(1)[0][0]
        middle = middle_slice(members)
        entry: dict[str, Any] = {
            "series": series,
            "files": len({r["path"] for r in members}),
            "slices": len(members),
            "voted": voted,
            "vote_share": round(share, 6),
            "mean_probability": round(mean_voted, 6),
        }
        entry.update({f"mean_prob_{c}": round(float(p), 6) for c, p in zip(classes, mean, strict=True)})
        entry.update(
            {
                "header_modality": header_modality,
                "header_class": header_class,
                "header_mismatch": int(
                    bool(header_class) and header_class != voted and mean_voted >= threshold
                ),
                "confidence": round(float(mapping(mean_voted, len(members))), 6),
                "series_from": series_origin(series, middle["path"]),
                "middle_path": middle["path"],
                "middle_frame": middle["frame"],
            }
        )
        header_other = sum(r.get("decision_from") == "header" for r in members) * 2 > len(members)
        entry["decision"], entry["decision_from"] = decide(
            voted, float(entry["confidence"]), unknown_below, header_other
        )
        table.append(entry)
    return table


def decide(
    answer: str, confidence: float, unknown_below: float | None, header_other: bool = False
) -> tuple[str, str]:
    """``(decision, decision_from)``: ``other`` when the header names a modality that is none of the classes
    (``header``); else ``unknown`` when a fitted threshold says this confidence is not trustworthy enough
    (``threshold``); else the model's ``answer`` (``pixels``)."""
    if header_other:
        return OTHER, "header"
    if unknown_below is not None and confidence < unknown_below:
        return "unknown", "threshold"
    return answer, "pixels"


def series_origin(series: str, path: str) -> str:
    """How a series was found: DICOM files sharing a SeriesInstanceUID; otherwise the file is the series
    (a NIfTI/Analyze/npy volume, one PNG/JPEG/PGM image, a DICOM file without the UID)."""
    kind = kind_of_path(Path(path))
    if kind == "dicom":
        return "SeriesInstanceUID" if series != path else "DICOM file without SeriesInstanceUID"
    return {"nifti": "volume file", "npy": "array file", "image": "image file"}.get(str(kind), "file")


def _batches(
    files: Sequence[Path],
    run: PredictionRun,
    reader: Callable[[Path], tuple[list[PendingSlice], list[dict[str, Any]]]],
    batch_size: int,
    progress: bool = True,
) -> Iterator[list[PendingSlice]]:
    """Batches of ready slices across file boundaries, so small files still fill the model's batch.

    A bar over files on a terminal (``progress`` and stderr a TTY; off in logs, as prepare's)."""
    from tqdm import tqdm

    pending: list[PendingSlice] = []
    with tqdm(
        total=len(files), desc="predict", unit="file", disable=None if progress and files else True
    ) as bar:
        for path in files:
            run.files_seen += 1
            slices, rejected = reader(path)
            run.unreadable.extend(rejected)
            pending.extend(slices)
            bar.update(1)
            while len(pending) >= batch_size:
                yield pending[:batch_size]
                pending = pending[batch_size:]
    if pending:
        yield pending


def predict_files(
    model: torch.nn.Module,
    data_info: Mapping[str, Any],
    target: Path,
    out_dir: Path,
    *,
    threshold: float = 0.9,
    batch_size: int = 64,
    fusion: str = "product",
    cnn_weight: float = DEFAULT_CNN_WEIGHT,
    progress: bool = True,
    calibration: FusionCalibration | None = None,
    labels: str | None = None,
    html_max: int = 1000,
) -> dict[str, Any]:
    """Predict every file under ``target``, write the CSVs and prediction_summary.json; returns the summary.

    Every path under ``target`` is predicted or listed in unreadable.csv with a reason; paths that are no
    regular file (FIFOs, dangling or looping links, links to folders, unreadable folders) are never opened.

    ``fusion`` (models with a fitted value head, see :mod:`modality.models.value_head`): ``product`` combines
    the CNN with the value-statistics head (``softmax(cnn_weight log p_cnn + log p_values)``), ``cnn`` uses
    the CNN alone, ``values`` the head alone. With a ``calibration`` (fitted on held-out predictions,
    :mod:`modality.models.fusion`) its head scales and fusion weights replace ``cnn_weight``. The head
    abstains on inputs without physical units (PNG/JPEG, colour DICOM): the CNN answers those alone.
    ``predicted`` and ``prob_*`` are the fused result; ``cnn_predicted`` is the CNN's own answer.

    ``labels`` (a CSV of ``path, label``, ``folder`` or ``header``; :mod:`modality.evaluation.given_labels`)
    adds the mislabel report: mislabels.csv, label_problems.csv and mislabels.html (thumbnails of the first
    ``html_max`` flagged rows).
    """
    check_fusion(fusion)
    classes = [str(c) for c in data_info["classes"]]
    stored = dict(data_info["preprocess"])
    preprocess = Preprocess.from_dict(stored)  # checked once per run, not per slice
    class_map, body_part_map = stored_label_maps(stored)
    if labels and str(labels) not in LABEL_MODES:
        read_label_table(Path(str(labels)))  # a missing file or column stops the run before the model runs
    files, not_files = list_input_files(target)
    run = PredictionRun(classes, threshold)
    run.files_seen += len(not_files)
    run.unreadable.extend(
        {"path": str(e.path), "frame": "", "reason": e.reason, "detail": e.detail} for e in not_files
    )

    def reader(path: Path) -> tuple[list[PendingSlice], list[dict[str, Any]]]:
        return read_file_slices(path, preprocess, class_map, body_part_map, classes)

    regions = [str(r) for r in data_info.get("regions") or []] if getattr(model, "region_head", None) else []
    # crossval fits the "unknown" thresholds on the fused decision's confidence: they mean nothing for another
    fitted = calibration is not None and fusion == "product"
    slice_unknown = calibration.unknown_below_slice if fitted else None
    series_unknown = calibration.unknown_below_series if fitted else None
    slice_map = calibration.slice_map() if fitted else ConfidenceMap()
    series_map = calibration.series_map() if fitted else ConfidenceMap()
    model.eval()
    for batch in _batches(files, run, reader, batch_size, progress):
        cnn, region_probs = predict_heads(model, [p.image for p in batch], data_info)
        features = [p.value_features for p in batch]
        probs = combine_with_values(model, cnn, features, fusion, cnn_weight, calibration)
        for i, (pending, fused, cnn_probs) in enumerate(zip(batch, probs, cnn, strict=True)):
            row = prediction_row(pending, fused, classes, threshold)
            row["cnn_predicted"] = classes[int(np.argmax(cnn_probs))]
            row["confidence"] = round(float(slice_map(np.max(fused))), 6)
            row["decision"], row["decision_from"] = decide(
                row["predicted"], row["confidence"], slice_unknown, pending.header_other
            )
            if regions and region_probs is not None:
                row.update(region_columns(pending, region_probs[i], regions, threshold))
            run.rows.append(row)

    prob_columns = [f"prob_{c}" for c in classes]
    columns = [*PREDICTION_COLUMNS, *prob_columns, "cnn_predicted", *HEADER_COLUMNS]
    if regions:
        columns += region_prediction_columns(regions)
    columns += ["confidence", "decision", "decision_from"]
    write_csv(out_dir / "predictions.csv", run.rows, columns)
    root = target if target.is_dir() else target.parent
    votes = series_votes(run.rows, classes, threshold, series_unknown, series_map)
    for vote in votes:
        vote["source"] = source_of(str(vote["middle_path"]), root)
    region_summary = region_votes(votes, run.rows, regions, threshold) if regions else None
    write_csv(out_dir / "series_votes.csv", votes, series_vote_columns(classes, regions))
    write_csv(out_dir / "unreadable.csv", run.unreadable, ["path", "frame", "reason", "detail"])
    companions = {u["path"] for u in run.unreadable if u["reason"] in COMPANION_REASONS}
    unreadable_files = {u["path"] for u in run.unreadable if u["frame"] == ""} - companions
    all_paths = [str(p) for p in files] + [str(e.path) for e in not_files]
    predicted_files = {str(r["path"]) for r in run.rows}
    result: dict[str, Any] = {
        "series": len(votes),
        "series_by_class": dict(Counter(str(v["voted"]) for v in votes)),
        # the vote, or "unknown" below calibration.json's unknown_below_series (fitted by crossval)
        "series_by_decision": dict(Counter(str(v["decision"]) for v in votes)),
        "unknown_below": {"slice": slice_unknown, "series": series_unknown},
        "series_header_mismatches": sum(v["header_mismatch"] for v in votes),
        "files": run.files_seen,
        "files_predicted": len(predicted_files),
        "files_unreadable": len(unreadable_files),
        # Analyze .hdr files read with their .img, .raw voxels read with their .mhd/.nhdr (in unreadable.csv)
        "companion_files": len(companions),
        "slices_predicted": len(run.rows),
        "slices_unreadable": sum(1 for u in run.unreadable if u["frame"] != ""),
        "header_mismatches": sum(r["header_mismatch"] for r in run.rows),
        "out_dir": str(out_dir),
    }
    if region_summary is not None:
        result["region_check"] = region_summary
    report = None
    if labels:
        report = check_given_labels(
            str(labels),
            root,
            all_paths,
            run.rows,
            votes,
            set(all_paths) - predicted_files,
            classes,
            class_map,
        )
        result["labels"] = report.summary
        write_csv(
            out_dir / "mislabels.csv",
            [{c: m[c] for c in MISLABEL_COLUMNS} for m in report.mislabels],
            MISLABEL_COLUMNS,
        )
        write_csv(out_dir / "label_problems.csv", report.problems, PROBLEM_COLUMNS)
    per_source = source_summary(
        all_paths,
        run.rows,
        unreadable_files,
        votes,
        root,
        report.units if report else None,
        report.problems if report else (),
    )
    result["per_source"] = {printable(k): v for k, v in per_source.items()}
    if report is not None:
        thumbnails = middle_slice_thumbnails(report.mislabels[:html_max], reader)
        totals = {k: v for k, v in report.summary.items() if isinstance(v, int)}
        page = render_mislabel_page(report.mislabels, thumbnails, result["per_source"], totals, html_max)
        write_text(out_dir / "mislabels.html", page)
    write_text(out_dir / "prediction_summary.json", json.dumps(result, indent=1, ensure_ascii=False))
    return result


def predict_from_config(cfg: Any) -> dict[str, Any]:
    """Raw-file prediction (``input=...``) on one device (called by eval.py)."""

    source = resolve_checkpoint(str(cfg.ckpt_path))
    accelerator = str((cfg.get("trainer") or {}).get("accelerator", "auto"))
    use_cuda = torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")
    model, data_info = load_classifier(source.checkpoint, "cuda" if use_cuda else "cpu")
    out_dir = output_folder(cfg, None)
    calibration, calibration_path = find_calibration(cfg.get("calibration"), source)
    if calibration_path is not None:
        print(f"fusion calibration: {calibration_path}")
    result = predict_files(
        model,
        data_info,
        Path(str(cfg.input)),
        out_dir,
        threshold=float(cfg.get("mismatch_threshold", 0.9)),
        batch_size=int(cfg.get("batch_size", 64)),
        fusion=str(cfg.get("fusion", "product")),
        cnn_weight=float(cfg.get("cnn_weight", DEFAULT_CNN_WEIGHT)),
        calibration=calibration,
        labels=cfg.get("labels"),
        html_max=int(cfg.get("mislabel_html_max", 1000)),
    )
    print(summary_text(result))
    return result


@dataclass
class LabelCheck:
    """Given labels against the series decisions: every unit, the flagged ones in report order, problems."""

    units: list[dict[str, Any]]
    mislabels: list[dict[str, Any]]
    problems: list[dict[str, str]]
    summary: dict[str, Any]


def check_given_labels(
    spec: str,
    root: Path,
    all_paths: Sequence[str],
    rows: Sequence[Mapping[str, Any]],
    votes: Sequence[Mapping[str, Any]],
    not_predicted: set[str],
    classes: Sequence[str],
    class_map: ClassMap,
) -> LabelCheck:
    """Match ``labels=`` (a CSV, ``folder`` or ``header``) to the input files and compare each labelled
    series with its vote (:mod:`modality.evaluation.given_labels`, :mod:`modality.evaluation.mislabels`).

    ``all_paths``: every path under the input (so a CSV naming an unreadable file is not "without a file");
    ``not_predicted``: those without a predicted slice (rejected, blank, companion files read with their volume)."""
    assignment = explicit_labels(spec, root, all_paths, classes, class_map)
    # a file whose header names a non-target modality is labelled `other` by it, like its decision
    header_classes = {
        str(r["path"]): str(r["header_class"]) or (OTHER if r.get("decision_from") == "header" else "")
        for r in rows
    }
    final = complete_with_headers(assignment, header_classes, not_predicted)
    units = label_units(rows, votes, final, root)
    mislabels = rank_mislabels(units)
    problems = sorted(assignment.problems, key=lambda p: (p["problem"], p["path"]))
    unknown = Counter(p["label"] for p in problems if p["problem"] == UNKNOWN_LABEL)
    summary: dict[str, Any] = {
        "labels": spec,
        "labelled_files": len(final),
        "labelled_series": len({u["series"] for u in units}),
        "disagreeing_series": len({u["series"] for u in mislabels}),
        "mislabel_rows": len(mislabels),
        "files_without_label": sum(1 for p in problems if p["problem"] == NO_LABEL),
        "labels_without_file": sum(1 for p in problems if p["problem"] == NO_FILE),
        "unknown_labels": sum(unknown.values()),
        "label_sources": dict(Counter(g.source for g in final.values())),
        "problems": dict(Counter(p["problem"] for p in problems)),
        "unknown_label_names": dict(unknown.most_common()),
    }
    return LabelCheck(units, mislabels, problems, summary)


def middle_slice_thumbnails(
    mislabels: Sequence[Mapping[str, Any]],
    reader: Callable[[Path], tuple[list[PendingSlice], list[dict[str, Any]]]],
) -> dict[int, bytes]:
    """rank -> PNG of the row's middle slice, re-read with the prediction's own reader (so the thumbnail is
    what the model saw). Re-reading a few flagged files costs less than keeping every slice of a pool."""
    cache: dict[str, dict[int, np.ndarray]] = {}
    thumbnails = {}
    for unit in mislabels:
        path = str(unit["middle_path"])
        if path not in cache:
            cache.clear()  # one file at a time: rows of one series are adjacent only by chance
            cache[path] = {p.frame: p.image for p in reader(Path(path))[0]}
        image = cache[path].get(int(unit["middle_frame"]))
        if image is not None:
            thumbnails[int(unit["rank"])] = thumbnail_png(image)
    return thumbnails


def summary_text(result: Mapping[str, Any]) -> str:
    """The console summary of a prediction run: series first (the decision a curator acts on), then files
    and slices, then the label check and its per-source counts when there is one."""
    by_class = ", ".join(f"{c} {n}" for c, n in sorted(result.get("series_by_class", {}).items()))
    decided = ", ".join(f"{c} {n}" for c, n in sorted(result.get("series_by_decision", {}).items()))
    lines = [
        f"{result['series']} series (pixel vote: {by_class or 'none'}; decision: {decided or 'none'}); header "
        f"disagrees with the vote in {result['series_header_mismatches']} series ({result['header_mismatches']} "
        "slices)",
        f"{result['files']} files: {result['files_predicted']} predicted ({result['slices_predicted']} slices), "
        f"{result['files_unreadable']} unreadable, {result['companion_files']} companion files read with their "
        f"volume (Analyze .hdr, MetaImage/NRRD data), {result['slices_unreadable']} slices skipped",
    ]
    region = result.get("region_check")
    if region:
        checks = region["checks"]
        wide = ", ".join(
            f"{s} ({v['value']}, {v['series']} series)" for s, v in region["collection_wide_sources"].items()
        )
        lines.append(
            f"body-part region vs BodyPartExamined: {checks['contradicts']} series contradict the tag, "
            f"{checks['missing']} have no usable tag, {checks['agrees']} agree; collection-wide values: "
            f"{wide or 'none'}"
        )
    labels = result.get("labels")
    if labels:
        lines.append(
            f"labels ({labels['labels']}): {labels['labelled_series']} series labelled, "
            f"{labels['disagreeing_series']} disagree with the pixels; {labels['files_without_label']} files "
            f"without a label, {labels['labels_without_file']} labels without a file, "
            f"{labels['unknown_labels']} unknown labels"
        )
        for source, counts in result.get("per_source", {}).items():
            lines.append(
                f"  {source}: {counts.get('files', 0)} files, {counts.get('series', 0)} series, "
                f"{counts.get('disagreeing_series', 0)} disagreeing"
            )
    lines.append(f"written: {result['out_dir']}")
    return "\n".join(lines)


def series_vote_columns(classes: Sequence[str], regions: Sequence[str] = ()) -> list[str]:
    """series_votes.csv columns: the original ones first (scripts read them by name), then the additions;
    with a body-part head, its vote and check last."""
    region_columns = [
        "region_voted",
        "region_vote_share",
        "region_mean_probability",
        "header_region",
        "region_mismatch",
        "region_check",
        "header_region_collection_wide",
    ]
    return [
        "series",
        "files",
        "slices",
        "voted",
        "vote_share",
        "mean_probability",
        *[f"mean_prob_{c}" for c in classes],
        "header_modality",
        "header_class",
        "header_mismatch",
        "confidence",
        "series_from",
        "source",
        "middle_path",
        "middle_frame",
        *(region_columns if regions else []),
        "decision",
        "decision_from",
    ]

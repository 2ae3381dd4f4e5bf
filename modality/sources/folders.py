"""Sources that list the files of a local folder as :class:`~modality.records.InputItem` objects.

Three layouts cover most public collections:

* :class:`DicomFolderSource` — a tree of DICOM files (any extension, or none: many archives store
  ``IM000001`` style names), labelled by each file's own Modality tag unless the config vouches for a class.
* :class:`ImageFolderSource` — PNG/JPEG/PGM radiographs that carry no tags: the class comes from the dataset
  config (one label for the folder, or one per sub-folder) or from a metadata CSV.
* :class:`VolumeSource` — NIfTI (``.nii``/``.nii.gz``), FreeSurfer ``.mgz``/``.mgh``, MetaImage, NRRD and ``.npy``
  stacks, one sample per slice along an axis.

Listing is sorted so the same folder always yields the same items in the same order (determinism starts
here), and nothing is opened beyond what is needed to recognise the file type. Every path under a folder is
accounted for (:func:`walk_folder`): a dangling or looping symlink, a link to a folder (not followed), a
FIFO, socket or device, or an unreadable folder is offered already rejected, with its reason, so it lands in
rejects.csv; only hidden names and, per source, names with another source's suffixes are left out.
"""

from __future__ import annotations

import csv
import errno
import os
import stat
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from modality.readers.raw_volume import DETACHED_DATA_SUFFIXES, RAW_VOLUME_SUFFIXES
from modality.readers.volume import FREESURFER_SUFFIXES, NIFTI_FILE_SUFFIXES
from modality.records import PRE_REJECTED, InputItem, printable

#: Image files Pillow reads: PNG, JPEG, PGM/PNM, TIFF (16-bit radiographs are often TIFF), BMP, WebP.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".pgm", ".pnm", ".tif", ".tiff", ".bmp", ".webp")
#: Volumes the NIfTI path reads (``kind="nifti"``): NIfTI, FreeSurfer MGH/MGZ, and MetaImage/NRRD through
#: readers/raw_volume.py.
NIFTI_SUFFIXES = (*NIFTI_FILE_SUFFIXES, *FREESURFER_SUFFIXES, *RAW_VOLUME_SUFFIXES)
#: Analyze 7.5 images: nibabel reads one with the ``.hdr`` beside it, the NIfTI way (docs/readers.md).
ANALYZE_SUFFIXES = (".img",)
VOLUME_SUFFIXES = (*NIFTI_SUFFIXES, ".npy")
#: Files never worth offering as DICOM: checksums, docs, archives and the like found in sample repositories.
NON_DICOM_SUFFIXES = (
    ".txt",
    ".md",
    ".json",
    ".csv",
    ".xml",
    ".html",
    ".py",
    ".zip",
    ".gz",
    ".tar",
    ".md5",
    ".sha1",
    ".yaml",
    ".yml",
    *IMAGE_SUFFIXES,
    ".nii",
    ".npy",
    *RAW_VOLUME_SUFFIXES,
    *DETACHED_DATA_SUFFIXES,  # the voxels of a .mhd/.nhdr header: read with it
)


@dataclass(frozen=True)
class FolderEntry:
    """One path found under a folder: a regular file to read (``reason`` None), or a path that cannot be
    read as one, with why (``folder``: a whole folder's contents went unread)."""

    path: Path
    reason: str | None = None
    detail: str = ""
    folder: bool = False


_SPECIAL_KINDS = (
    (stat.S_ISFIFO, "FIFO"),
    (stat.S_ISSOCK, "socket"),
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
)


def not_a_regular_file(mode: int) -> str:
    """The reason for a path whose ``st_mode`` is neither a regular file nor a folder."""
    kind = next((name for test, name in _SPECIAL_KINDS if test(mode)), f"file type {stat.S_IFMT(mode):o}")
    return f"not a regular file ({kind})"


def _os_error(error: OSError) -> str:
    return printable(error.strerror or str(error))


def classify_path(path: Path) -> FolderEntry:
    """What ``path`` is, without opening it (a FIFO is never opened: opening one blocks until a writer
    comes). Symlinks are resolved: a link to a regular file is that file; a dangling link, a link loop,
    a link to a folder (never followed, so nothing is read twice or forever) and anything that is not a
    regular file or folder come back with a reason."""
    try:
        own = path.lstat()
    except OSError as error:
        return FolderEntry(path, "cannot stat path", _os_error(error))
    link = stat.S_ISLNK(own.st_mode)
    target = ""
    if link:
        try:
            target = printable(os.readlink(path))
            info = path.stat()
        except OSError as error:
            if error.errno == errno.ELOOP:
                return FolderEntry(path, "symlink loop", f"-> {target}")
            if error.errno in (errno.ENOENT, errno.ENOTDIR):
                return FolderEntry(path, "dangling symlink", f"-> {target} does not exist")
            return FolderEntry(path, "unreadable symlink", f"-> {target}: {_os_error(error)}")
    else:
        info = own
    if stat.S_ISREG(info.st_mode):
        return FolderEntry(path)
    if stat.S_ISDIR(info.st_mode):
        if not link:
            return FolderEntry(path, folder=True)
        real, parent = os.path.realpath(path), os.path.realpath(path.parent)
        if parent == real or parent.startswith(real.rstrip(os.sep) + os.sep):
            return FolderEntry(
                path, "symlink loop", f"-> {target}, a folder that holds the link", folder=True
            )
        return FolderEntry(path, "symlink to a folder (not followed)", f"-> {target}", folder=True)
    detail = f"-> {target}" if link else ""
    return FolderEntry(path, not_a_regular_file(info.st_mode), detail)


def walk_folder(root: str | Path) -> Iterator[FolderEntry]:
    """Every path under ``root`` in a stable (sorted, depth-first) order, hidden names skipped: each regular
    file, and each path that is not one with its reason (see :func:`classify_path`), an unreadable folder
    included. Nothing under ``root`` is dropped without a word."""
    root = Path(root)
    if not root.is_dir():
        problem = classify_path(root) if os.path.lexists(root) else None
        raise FileNotFoundError(
            f"source folder {'is not a folder' if problem else 'does not exist'}: {printable(root)}"
            + (f" ({problem.reason or 'a regular file'})" if problem else "")
        )
    yield from _walk(root)


def _walk(folder: Path) -> Iterator[FolderEntry]:
    try:
        with os.scandir(folder) as listing:
            names = sorted(entry.name for entry in listing)
    except OSError as error:
        yield FolderEntry(folder, "unreadable folder", _os_error(error), folder=True)
        return
    for name in names:
        if name.startswith("."):
            continue
        entry = classify_path(folder / name)
        if entry.folder and entry.reason is None:
            yield from _walk(entry.path)
        else:
            yield entry


def offered_paths(
    root: str | Path, wanted: Callable[[Path], bool]
) -> Iterator[tuple[Path, dict[str, str] | None]]:
    """What a folder source offers, in :func:`walk_folder` order: each regular file whose name is
    ``wanted`` (None), and each path that cannot be read as a file with its rejection (the
    ``InputItem.extra[PRE_REJECTED]`` prepare writes to rejects.csv): folders always, since their contents
    are unknown, other paths when their name is ``wanted``."""
    for entry in walk_folder(root):
        if entry.reason is None:
            if wanted(entry.path):
                yield entry.path, None
        elif entry.folder or wanted(entry.path):
            yield entry.path, {"reason": entry.reason, "detail": entry.detail}


def _extra(rejected: dict[str, str] | None) -> dict[str, object]:
    return {PRE_REJECTED: rejected} if rejected else {}


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def kind_of_path(path: Path) -> str | None:
    """The reader kind (:mod:`modality.readers`) a file of a mixed folder goes to, from its name alone, or
    None for a name that is never a medical image (:data:`NON_DICOM_SUFFIXES`: checksums, docs, archives).

    Everything else goes to the DICOM reader, which rejects non-DICOM content with a reason: DICOM files
    often have no suffix at all. The one-kind sources below list by their own suffixes instead:
    :class:`DicomFolderSource` offers ``.img`` files as DICOM, since some archives name DICOM files so (the
    Agfa series of the shared corpus); here an ``.img`` is Analyze only with its ``.hdr`` beside it.
    """
    suffix = _suffix(path)
    if suffix in ANALYZE_SUFFIXES and not path.with_suffix(".hdr").exists():
        return "dicom"  # an Analyze image always has its .hdr beside it; a lone .img is a DICOM file so named
    if suffix in NIFTI_SUFFIXES or suffix in ANALYZE_SUFFIXES:
        return "nifti"
    if suffix == ".npy":
        return "npy"
    if suffix in IMAGE_SUFFIXES:
        return "image"
    if suffix in NON_DICOM_SUFFIXES:
        return None
    return "dicom"


class DicomFolderSource:
    """All DICOM files below ``root`` as one dataset.

    ``label`` forces a class for every file (rarely right: most folders mix modalities), otherwise the
    reader's Modality tag decides. Files with an obviously non-DICOM suffix are not offered; everything else
    is, so preamble-less files still reach the reader, which rejects non-DICOM content with a reason.
    """

    def __init__(self, root: str | Path, dataset: str, label: str | None = None) -> None:
        self.root = Path(root)
        self.dataset = dataset
        self.label = label

    def items(self) -> list[InputItem]:
        return [
            InputItem(
                path=str(path), dataset=self.dataset, kind="dicom", label=self.label, extra=_extra(rejected)
            )
            for path, rejected in offered_paths(self.root, lambda p: _suffix(p) not in NON_DICOM_SUFFIXES)
        ]


def read_label_csv(csv_path: str | Path, path_column: str = "path") -> dict[str, dict[str, str]]:
    """Rows of a metadata CSV keyed by the file path relative to the image folder (forward slashes)."""
    with Path(csv_path).open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or path_column not in reader.fieldnames:
            raise ValueError(f"{csv_path}: metadata CSV needs a {path_column!r} column")
        return {row[path_column].replace("\\", "/"): row for row in reader}


class ImageFolderSource:
    """PNG/JPEG/PGM files below ``root``; their class comes from config, never from pixels.

    Exactly one of ``label`` (whole folder), ``labels`` (first-level sub-folder name -> class) or
    ``metadata_csv`` (columns ``path`` relative to ``root``, ``class``, optional ``modality``,
    ``body_part``, ``patient_id``) must say what each image is. Files the CSV or sub-folder map does not
    cover are still offered with ``label=None`` so prepare records them as rejects instead of dropping them.
    """

    def __init__(
        self,
        root: str | Path,
        dataset: str,
        label: str | None = None,
        labels: Mapping[str, str] | None = None,
        metadata_csv: str | Path | None = None,
        modality: str | None = None,
        body_part: str | None = None,
    ) -> None:
        given = [x is not None for x in (label, labels, metadata_csv)]
        if sum(given) != 1:
            raise ValueError(
                f"ImageFolderSource({dataset}): give exactly one of label, labels or metadata_csv, "
                "because image files carry no tags to label them"
            )
        self.root = Path(root)
        self.dataset = dataset
        self.label = label
        self.labels = dict(labels) if labels is not None else None
        self.metadata_csv = metadata_csv
        self.modality = modality
        self.body_part = body_part

    def items(self) -> list[InputItem]:
        rows = read_label_csv(self.metadata_csv) if self.metadata_csv is not None else {}
        out = []
        for path, rejected in offered_paths(self.root, lambda p: _suffix(p) in IMAGE_SUFFIXES):
            rel = path.relative_to(self.root).as_posix()
            row = rows.get(rel, {})
            label = self._label_for(rel, row)
            out.append(
                InputItem(
                    path=str(path),
                    dataset=self.dataset,
                    kind="image",
                    label=label,
                    modality=row.get("modality") or self.modality or label,
                    body_part=row.get("body_part") or self.body_part,
                    # Unknown patient: the file itself, namespaced so equal stems in two datasets are not
                    # mistaken for one patient by the cross-split guard.
                    patient_id=row.get("patient_id") or f"{self.dataset}:{rel}",
                    extra=_extra(rejected),
                )
            )
        return out

    def _label_for(self, rel: str, row: Mapping[str, str]) -> str | None:
        if self.label is not None:
            return self.label
        if self.labels is not None:
            return self.labels.get(rel.split("/", 1)[0])
        return row.get("class") or None


class VolumeSource:
    """NIfTI and ``.npy`` volumes below ``root``, one dataset, one class, slices along ``slice_axis``.

    Volumes carry no modality tag, so ``label`` is required; each file is treated as one patient and one
    series unless the caller knows better (patient ids default to the file stem so the patient guard and the
    even-across-patients sampling still have something to group by).
    """

    def __init__(
        self,
        root: str | Path,
        dataset: str,
        label: str,
        slice_axis: int = 2,
        modality: str | None = None,
        body_part: str | None = None,
    ) -> None:
        self.root = Path(root)
        self.dataset = dataset
        self.label = label
        self.slice_axis = slice_axis
        self.modality = modality
        self.body_part = body_part

    def items(self) -> list[InputItem]:
        out = []
        for path, rejected in offered_paths(self.root, lambda p: _suffix(p) in VOLUME_SUFFIXES):
            suffix = _suffix(path) if _suffix(path) in VOLUME_SUFFIXES else ""
            stem = path.name[: len(path.name) - len(suffix)]
            out.append(
                InputItem(
                    path=str(path),
                    dataset=self.dataset,
                    kind="npy" if suffix == ".npy" else "nifti",
                    label=self.label,
                    modality=self.modality or self.label,
                    body_part=self.body_part,
                    patient_id=f"{self.dataset}:{stem}",
                    series_uid=f"{self.dataset}:{stem}",
                    slice_axis=self.slice_axis,
                    extra=_extra(rejected),
                )
            )
        return out

"""DICOM Modality code -> training class, from a YAML class map (``configs/class_map/default.yaml``).

The default pools the radiograph codes CR (computed radiography), DX (digital X-ray) and MG (mammography)
into one XR class, as the reference study did; every other code is excluded (``class_of`` returns None)
unless a map lists it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from modality.paths import CONFIG_DIR

DEFAULT_CLASS_MAP_PATH = CONFIG_DIR / "class_map" / "default.yaml"
DEFAULT_CLASSES = ("CT", "MR", "PT", "XR")
DEFAULT_CODES = {"CT": "CT", "MR": "MR", "PT": "PT", "CR": "XR", "DX": "XR", "MG": "XR"}
#: The answer for a file that is none of the classes (ultrasound, nuclear medicine, angiography, secondary
#: captures...): ``eval.py input=`` gives it where the DICOM header names such a modality.
OTHER = "other"
#: The Modality (0008,0060) defined terms of the DICOM standard (PS3.3 C.7.3.1.1.1), current and retired. Only
#: these count as "a modality that is none of the classes": a free-text value ("MRI", "PET-CT") says nothing
#: the pixels should not decide.
_DEFINED_TERMS = (
    "AR ASMT AU BDUS BI BMD CR CT CTPROTOCOL DG DOC DX ECG EPS ES FID GM HC HD IO IOL IVOCT IVUS KER KO LEN LS "
    "MG MR M3D NM OAM OCT OP OPM OPT OPTBSV OPTENF OPV OSS OT PLAN POS PR PT PX REG RESP RF RG RTDOSE RTIMAGE "
    "RTINTENT RTPLAN RTRAD RTRECORD RTSEGANN RTSTRUCT RWV SEG SM SMR SR SRF STAIN TEXTUREMAP TG US VA XA "
    "XAPROTOCOL XC "
    # retired terms still found in old archives, and SC (secondary capture), used in practice for OT
    "AS CD CF CP CS DD DF DM DS EC FA FS LP MA MS OPR ST VF SC"
)
DICOM_MODALITY_CODES = frozenset(_DEFINED_TERMS.split())


def normalise_code(code: str | None) -> str:
    """Header codes come with stray spaces and lower case in old files; compare them upper-cased."""
    return (code or "").strip().upper()


@dataclass(frozen=True)
class ClassMap:
    """Ordered classes plus the code -> class table."""

    classes: tuple[str, ...] = DEFAULT_CLASSES
    codes: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_CODES))

    def __post_init__(self) -> None:
        if len(set(self.classes)) != len(self.classes) or not self.classes:
            raise ValueError(f"class map classes must be non-empty and unique, got {list(self.classes)}")
        unknown = {cls for cls in self.codes.values() if cls not in self.classes}
        if unknown:
            raise ValueError(f"class map sends codes to classes not in `classes`: {sorted(unknown)}")
        object.__setattr__(self, "codes", {normalise_code(k): v for k, v in self.codes.items()})

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ClassMap:
        """Build from a mapping with ``classes`` and ``codes`` (a plain dict or an OmegaConf node)."""
        if "classes" not in config or "codes" not in config:
            raise ValueError("a class map needs `classes` and `codes`")
        return cls(
            classes=tuple(str(c) for c in config["classes"]),
            codes={str(k): str(v) for k, v in dict(config["codes"]).items()},
        )

    @classmethod
    def from_yaml(cls, path: str | Path) -> ClassMap:
        with open(path, encoding="utf-8") as handle:
            return cls.from_config(yaml.safe_load(handle))

    @classmethod
    def default(cls) -> ClassMap:
        """The project's default map (the YAML when the checkout has it, else the same built-in table)."""
        if DEFAULT_CLASS_MAP_PATH.is_file():
            return cls.from_yaml(DEFAULT_CLASS_MAP_PATH)
        return cls()

    def class_of(self, code: str | None) -> str | None:
        """The class of a DICOM Modality code, or None when the map excludes it."""
        return self.codes.get(normalise_code(code))

    def names_other(self, code: str | None) -> bool:
        """True when a header's Modality code is a DICOM defined term (:data:`DICOM_MODALITY_CODES`) that the
        map sends to no class (US, NM, XA, OT, SC, ...). An empty code or a free-text value says nothing, so
        it is False.

        Why the header decides this and the pixels do not: a model trained on four classes has no way to say
        "none of them", and the corpus's 68 non-target files (US 21, OT 27, NM 11, XA 6, SC 2, XC 1) come
        almost all from one source group, so a pixel-trained fifth class could not be checked on sources it
        never saw. A US/NM/XA code is rarely wrong; a wrong CT/MR/PT code is what the pixels are for."""
        normalised = normalise_code(code)
        return normalised in DICOM_MODALITY_CODES and normalised not in self.codes

    def index(self, cls: str) -> int:
        """Position of a class in ``classes`` (the ``.cls`` value); ValueError for an unknown class."""
        try:
            return self.classes.index(cls)
        except ValueError:
            raise ValueError(f"unknown class {cls!r}; classes are {list(self.classes)}") from None

    def to_dict(self) -> dict[str, Any]:
        """Plain types for summary.json and checkpoints."""
        return {"classes": list(self.classes), "codes": dict(self.codes)}


def resolve_class(header_modality: str | None, item_label: str | None, class_map: ClassMap) -> str | None:
    """The training class of one file, or None to exclude it.

    A source label wins when given (a manifest that vouches for the class, or a PNG collection with no
    header); it may name a class (``XR``) or a code the map knows (``CR``); any other label (e.g. a
    manifest's ``other``) excludes the file. Without a label the header's Modality code goes through the map.
    """
    if item_label is not None and item_label.strip():
        label = item_label.strip()
        if label in class_map.classes:
            return label
        return class_map.class_of(label)
    return class_map.class_of(header_modality)

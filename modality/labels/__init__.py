"""Labels: DICOM Modality code -> class (class map) and BodyPartExamined -> normalised region."""

from modality.labels.body_parts import REGIONS, BodyPartMap, body_part_key, coverage_report
from modality.labels.class_map import ClassMap, resolve_class

__all__ = ["REGIONS", "BodyPartMap", "ClassMap", "body_part_key", "coverage_report", "resolve_class"]

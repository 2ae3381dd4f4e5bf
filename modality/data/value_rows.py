"""The value statistics prepare recorded for each sample, read back from the shards' JSON members alone.

The value heads learn from these rows, not from pixels: training fits them on the training split's rows
(``ModalityDataModule.train_value_features`` and ``train_exported_radiographs``, read through
:func:`value_row`) and the value-head scripts refit them on a prepared pool's rows fold by fold
(``scripts/value_head_loso.py``, ``scripts/fused_as_floats.py``). One reader serves all three so that what
counts as "has physical units", which rows are 8-bit radiographs, and what a sample without statistics means
(shards prepared before they were recorded: an error naming the shard) cannot drift between them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ValueRow:
    """One sample's recorded value statistics.

    ``units`` says whether its values have physical units (DICOM, volumes): the main value head answers only
    those; the rest (8-bit PNG/JPEG) it never answers, though training learns from the radiographs among them
    as if they were DICOM (:func:`modality.intensity.value_stats.as_detector_radiographs`).
    """

    key: str
    dataset: str
    label: str
    features: tuple[float, ...]
    units: bool

    @property
    def exported_radiograph(self) -> bool:
        """An 8-bit radiograph (no physical units, class X-ray): never answered by the main value head, but
        learnt from as a DICOM radiograph."""
        from modality.intensity.value_stats import RADIOGRAPH_CLASS

        return not self.units and self.label == RADIOGRAPH_CLASS


def value_row(key: str, meta: Any, where: str) -> ValueRow:
    """The row of one sample from its decoded JSON member; ``ValueError`` naming ``where`` (its shard) when
    the sample has no ``value_features`` (prepared before they were recorded: prepare again)."""
    from modality.models.fusion import has_physical_units

    values = meta.get("value_features") if isinstance(meta, dict) else None
    if not values:
        raise ValueError(f"{where}: sample {key} has no value_features; prepare the data again")
    return ValueRow(
        key=key,
        dataset=str(meta.get("dataset", "")),
        label=str(meta.get("class", "")),
        features=tuple(float(v) for v in values),
        units=has_physical_units(meta),
    )


def prepared_value_rows(prepared_dir: str | Path) -> Iterator[ValueRow]:
    """Every sample of every listed shard of a prepared pool (all splits), from its JSON member (the image
    members are read past, never decoded)."""
    from modality.shards.decode import decode_json
    from modality.shards.listing import listed_shard_paths
    from modality.shards.reader import read_shard_samples

    for shard in listed_shard_paths(prepared_dir):
        for key, members in read_shard_samples(shard):
            yield value_row(key, decode_json(members["json"]), str(shard))

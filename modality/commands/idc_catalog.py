"""``python -m modality.commands.idc_catalog``: what IDC offers per collection and class, from the bundled index (Hydra app).

Prints a readable table and writes it as CSV (``out=``). The work is in :mod:`modality.sources.idc.catalog`.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from modality.labels import BodyPartMap, ClassMap
from modality.paths import CONFIG_DIR
from modality.sources.idc.catalog import (
    format_catalog_table,
    read_index,
    select_image_series,
    summarise_catalog,
)


def load_image_series(cfg: DictConfig) -> tuple[pd.DataFrame, ClassMap]:
    """Image series of the index with class and normalised body part, per the config's maps and filters."""
    class_map = ClassMap.from_config(OmegaConf.to_container(cfg.class_map, resolve=True))
    body_part_map = BodyPartMap.from_config(OmegaConf.to_container(cfg.body_parts, resolve=True))
    index = read_index(cfg.get("index_path"), codes=class_map.codes)
    series = select_image_series(
        index,
        class_of=class_map.class_of,
        body_part_of=body_part_map.normalise,
        exclude_sop_classes=list(cfg.get("exclude_sop_classes") or []),
    )
    return series, class_map


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="idc_catalog")
def main(cfg: DictConfig) -> None:
    series, _ = load_image_series(cfg)
    table = summarise_catalog(series)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False)
    max_rows = cfg.get("max_rows")
    print(format_catalog_table(table, None if max_rows is None else int(max_rows)))
    print(
        f"\n{len(table)} collection x class rows from {table['collection_id'].nunique()} collections -> {out}"
    )


if __name__ == "__main__":
    main()

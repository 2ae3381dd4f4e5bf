"""``python -m modality.prepare``: a dataset pool -> leakage-free WebDataset shards (Hydra app).

With no arguments it builds the built-in demo pool. ``dataset=real_shared out_dir=DIR`` prepares the shared
real corpus. The passes themselves live in :mod:`modality.shards.build`; this module only turns the Hydra
config into plain settings, instantiates the pool's sources, and offers the two helpers training uses
(:func:`is_prepared`, :func:`build_in_subprocess`).
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import warnings
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from omegaconf import DictConfig, OmegaConf

from modality.intensity.pipeline import Preprocess
from modality.labels import BodyPartMap, ClassMap
from modality.locks import folder_lock
from modality.paths import CONFIG_DIR, shared_data_root
from modality.records import InputItem
from modality.shards.listing import listed_shard_paths
from modality.shards.parts import check_part
from modality.shards.summary import SUMMARY_NAME

if TYPE_CHECKING:
    from modality.shards.build import BuildSettings
    from modality.streaming import StreamSettings

# Lets dataset YAMLs point at the shared corpus wherever the checkout is (MODALITY_SHARED_DATA overrides).
OmegaConf.register_new_resolver("shared_data_root", lambda: str(shared_data_root()), replace=True)


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def list_items(sources_cfg: Sequence[Any]) -> list[InputItem]:
    """Instantiate each source (``_target_``) and collect its items."""
    items: list[InputItem] = []
    for source_cfg in sources_cfg:
        source = hydra.utils.instantiate(source_cfg)
        items.extend(source.items())
    return items


def preprocess_from_cfg(cfg: DictConfig) -> Preprocess:
    """The core of ``summary.json["preprocess"]``, checked once here: what ``slice_to_uint8`` and the reader
    need. ``scaling`` is the strategy ``configs/scaling/*.yaml`` names by ``_target_``."""
    return Preprocess(
        image_size=int(cfg.image_size),
        aspect=str(cfg.aspect),
        scaling=hydra.utils.instantiate(cfg.scaling, _convert_="all"),
        colour=str(cfg.colour),
    )


def caps_from_cfg(cfg: DictConfig) -> dict[str, int | None]:
    """Global caps, overridden per pool by ``dataset.caps`` (``null`` = uncapped)."""
    caps = dict(_plain(cfg.get("caps")) or {})
    caps.update(_plain(cfg.dataset.get("caps")) or {})
    return {str(k): (None if v is None else int(v)) for k, v in caps.items()}


def prepare(cfg: DictConfig) -> Path:
    """Build shards for ``cfg.dataset`` into ``cfg.out_dir``; returns ``out_dir``.

    With ``skip_if_prepared`` an ``out_dir`` that another process finished while this one waited for the
    lock is left as it is. With ``parts=N part=i`` only part ``i``'s pass 1 runs (into
    ``out_dir/parts/``); ``parts=N merge=true`` then writes the shards from all N (docs/prepare.md).
    """
    if cfg.image_format not in ("png", "npy"):
        raise ValueError(f"image_format must be png or npy, got {cfg.image_format!r}")
    out_dir = Path(str(cfg.out_dir))
    parts = cfg.get("parts")
    if parts is not None and not cfg.get("merge", False):
        if cfg.get("part") is None:
            raise ValueError(f"parts={parts} needs part=<0..parts-1> (or merge=true to merge them)")
        check_part(cfg.part, parts)
        return _prepare_part(cfg, out_dir)  # locks its own part folder: parts run side by side
    if cfg.get("merge", False) and parts is None:
        raise ValueError("merge=true needs parts=<N>, the number of parts that were run")
    with folder_lock(out_dir):
        if cfg.get("skip_if_prepared", False) and is_prepared(out_dir):
            check_stored_preprocess(out_dir, preprocess_from_cfg(cfg))
            print(f"{out_dir} is already prepared; skipping (skip_if_prepared=true)")
            return out_dir
        return _prepare_locked(cfg, out_dir)


def check_stored_preprocess(out_dir: Path, requested: Preprocess) -> None:
    """Refuse to reuse shards prepared with another preprocessing than the one requested (scaling, size,
    aspect, colour): training on them would silently measure a different recipe."""
    stored_dict = json.loads((out_dir / SUMMARY_NAME).read_text(encoding="utf-8")).get("preprocess", {})
    try:
        stored = Preprocess.from_dict(stored_dict)
    except (ValueError, TypeError) as exc:
        raise ValueError(
            f"{out_dir} records a preprocessing this version cannot read ({exc}): prepare into another "
            "out_dir (or data.data_dir), or delete this one to rebuild it"
        ) from exc
    old_form, new_form = stored.to_dict(), requested.to_dict()
    differs = [f.name for f in fields(Preprocess) if getattr(stored, f.name) != getattr(requested, f.name)]
    if differs:
        detail = "; ".join(f"{key}: stored {old_form[key]!r}, requested {new_form[key]!r}" for key in differs)
        raise ValueError(
            f"{out_dir} was prepared with another preprocessing ({detail}): prepare into another out_dir "
            "(or data.data_dir), or delete this one to rebuild it"
        )


def dataset_body_parts(cfg: DictConfig) -> dict[str, str]:
    """The pool's dataset-level regions (``dataset.body_part``: dataset -> BodyPartExamined-style value or
    region), checked against the body-part map and the split map before anything is read."""
    from modality.labels.body_parts import check_dataset_facts

    facts = {str(k): str(v) for k, v in (_plain(cfg.dataset.get("body_part")) or {}).items()}
    unknown = sorted(set(facts) - set(_plain(cfg.dataset.split) or {}))
    if unknown:
        raise ValueError(f"dataset.body_part names datasets the split map does not list: {unknown}")
    return check_dataset_facts(facts, BodyPartMap.from_config(_plain(cfg.body_parts)))


def build_settings(cfg: DictConfig, out_dir: Path) -> BuildSettings:
    """The plain settings the passes take, from the Hydra config."""
    from modality.shards.build import BuildSettings

    return BuildSettings(
        out_dir=out_dir,
        split_of={str(k): str(v) for k, v in (_plain(cfg.dataset.split) or {}).items()},
        class_map=ClassMap.from_config(_plain(cfg.class_map)),
        body_part_map=BodyPartMap.from_config(_plain(cfg.body_parts)),
        preprocess=preprocess_from_cfg(cfg),
        caps=caps_from_cfg(cfg),
        seed=int(cfg.seed),
        workers=int(cfg.workers),
        image_format=str(cfg.image_format),
        png_compress_level=int(cfg.png_compress_level),
        shard_max_samples=int(cfg.shard_max_samples),
        pool_name=str(cfg.dataset.name),
        progress=bool(cfg.progress),
        charts=bool(cfg.charts),
        keep_work=bool(cfg.get("keep_work", True)),
        single_pass=bool(cfg.get("single_pass", True)),
        dataset_body_parts=dataset_body_parts(cfg),
    )


def _prepare_locked(cfg: DictConfig, out_dir: Path) -> Path:
    from modality.shards.build import build_shards
    from modality.shards.parts import merge_parts

    settings = build_settings(cfg, out_dir)
    if cfg.get("merge", False):
        items = _stream_listing(cfg) if _streaming(cfg) else list_items(cfg.dataset.sources)
        stream = " stream.enabled=true" if _streaming(cfg) else ""
        hint = (
            f"python -m modality.prepare -m dataset={cfg.dataset.name}{stream} ... parts={cfg.parts} "
            f"'part=range({cfg.parts})'"
        )
        summary_path = merge_parts(items, settings, int(cfg.parts), command_hint=hint)
    else:
        if _streaming(cfg):
            raise ValueError("stream.enabled=true streams parts: run it with parts=N part=i, then merge=true")
        summary_path = build_shards(list_items(cfg.dataset.sources), settings)
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    counts = ", ".join(f"{s}: {summary['splits'][s]['samples']}" for s in summary["splits"])
    inputs = summary["inputs"]
    print(
        f"prepared {out_dir}: {counts} samples; {inputs['files']} files, {inputs['written_files']} written, "
        f"{inputs['rejected_files']} rejected (see rejects.csv)"
    )
    return out_dir


def _streaming(cfg: DictConfig) -> bool:
    return bool((cfg.get("stream") or {}).get("enabled", False))


def _stream_settings(cfg: DictConfig) -> StreamSettings:
    from modality.streaming import StreamSettings

    stream = dict(_plain(cfg.stream))
    stream.pop("enabled", None)
    return StreamSettings(**stream)


def _stream_listing(cfg: DictConfig) -> list[InputItem]:
    from modality.streaming import series_listing

    sources = [hydra.utils.instantiate(source_cfg) for source_cfg in cfg.dataset.sources]
    return series_listing(sources, _stream_settings(cfg).sample_instances)


def _prepare_part(cfg: DictConfig, out_dir: Path) -> Path:
    from modality.shards.parts import build_part, read_record

    settings = build_settings(cfg, out_dir)
    if _streaming(cfg):
        from modality.streaming import stream_part

        sources = [hydra.utils.instantiate(source_cfg) for source_cfg in cfg.dataset.sources]
        record = stream_part(sources, settings, int(cfg.part), int(cfg.parts), _stream_settings(cfg))
    else:
        record = build_part(list_items(cfg.dataset.sources), settings, int(cfg.part), int(cfg.parts))
    head, _ = read_record(record.parent) or ({}, [])
    print(
        f"part {head.get('part')} of {head.get('parts')} of {out_dir}: {head.get('files')} files, "
        f"{head.get('decoded_files')} decoded, {head.get('rejected_files')} rejected; merge with "
        f"parts={head.get('parts')} merge=true once every part has finished"
    )
    return out_dir


def is_prepared(out_dir: str | Path) -> bool:
    """True when ``out_dir`` holds a finished prepare run: a readable summary.json and every shard it lists."""
    try:
        shards = listed_shard_paths(out_dir)  # names checked as training reads them
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return all(path.is_file() for path in shards)


_SAFE_OVERRIDE_VALUE = re.compile(r"^[A-Za-z0-9_./+-]+$")


def _override_value(value: str) -> str:
    """Quote a path for Hydra's override grammar when it holds characters the grammar would parse."""
    if _SAFE_OVERRIDE_VALUE.match(value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def build_in_subprocess(dataset: str, out_dir: str | Path, overrides: Sequence[str] = ()) -> None:
    """Run ``python -m modality.prepare dataset=... out_dir=...`` in a fresh process.

    Training calls this to build the demo when it is missing; a subprocess keeps prepare's worker pool and
    Hydra state out of the training process. Safe to call from several processes at once (DDP ranks): the
    first builds, the others wait on the lock and then find it prepared. Raises ``RuntimeError`` with the
    tail of stderr on failure.
    """
    command = [
        sys.executable,
        "-m",
        "modality.prepare",
        f"dataset={dataset}",
        f"out_dir={_override_value(str(Path(out_dir).resolve()))}",
        "progress=false",
        "skip_if_prepared=true",
        *overrides,
    ]
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-30:])
        raise RuntimeError(f"prepare failed (exit {proc.returncode}) for dataset={dataset}:\n{tail}")


def quiet_decoder_warnings() -> None:
    """Silence pydicom's per-file warnings (invalid UIDs, padding...): on real archives they bury the
    progress bar by the thousand, and every file that cannot be used is in rejects.csv with its reason.
    Worker processes are forked after this, so they inherit it."""
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\..*)?$")


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="prepare")
def main(cfg: DictConfig) -> None:
    from modality.shards.parts import PartsNotReady

    if cfg.get("quiet_decoder_warnings", True):
        quiet_decoder_warnings()
    try:
        prepare(cfg)
    except PartsNotReady as error:  # a state to fix by running parts, not a bug: the message, no traceback
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()

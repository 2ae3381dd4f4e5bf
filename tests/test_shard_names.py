"""Shard names come from summary.json, which is data: a name must never run as a shell command or reach
outside the shard folder, wherever it is read (training, evaluation, crossval's reader, audit)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tiny_shards import write_tiny_shards

from modality.commands.audit import find_shards
from modality.data.datamodule import ModalityDataModule
from modality.data.tar_samples import local_path_of
from modality.prepare import is_prepared
from modality.shards.listing import listed_shard_paths, plan_split, read_summary
from modality.shards.reader import read_shard_samples
from modality.shards.writer import check_shard_name, shard_name

HOSTILE_NAMES = [
    "train-000000.tar; touch {marker} #",
    "$(touch {marker}).tar",
    "`touch {marker}`-000000.tar",
    "train-000000.tar | touch {marker}",
    "../outside/train-000000.tar",
    "/etc/train-000000.tar",
    "sub/train-000000.tar",
    "..",
    "train-000000.tar\n",
    "train 000000.tar",
    "",
]


def rename_first_shard(data_dir: Path, split: str, new_name: str) -> Path:
    """Point summary.json's first ``split`` shard at ``new_name`` (as a hostile summary would)."""
    summary_path = data_dir / "summary.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    summary["splits"][split]["shards"][0]["name"] = new_name
    summary_path.write_text(json.dumps(summary), encoding="utf-8")
    return summary_path


def test_every_name_the_writer_writes_passes() -> None:
    for split in ("train", "val", "test"):
        for number in (0, 7, 999_999, 1_000_000):
            assert check_shard_name(shard_name(split, number), "summary.json") == shard_name(split, number)


@pytest.mark.parametrize("template", HOSTILE_NAMES)
def test_hostile_name_is_refused_naming_the_entry_and_the_summary(template: str, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    data_dir = write_tiny_shards(tmp_path / "data", {"train": [2], "val": [2]})
    name = template.format(marker=marker)
    summary_path = rename_first_shard(data_dir, "train", name)
    summary = json.loads(summary_path.read_text(encoding="utf-8"))

    with pytest.raises(ValueError, match="refusing shard name") as raised:
        read_summary(summary_path)
    assert repr(name) in str(raised.value) and str(summary_path) in str(raised.value)
    # The same check where a caller hands over the parsed summary itself, with a pipe: template.
    with pytest.raises(ValueError, match="refusing shard name") as raised:
        plan_split(summary, "train", data_dir / "shards", url_template=f"pipe:cat {data_dir}/shards/{{name}}")
    assert repr(name) in str(raised.value) and str(summary_path) in str(raised.value)

    module = ModalityDataModule(
        str(data_dir), prepare_dataset=None, shard_url_template=f"pipe:cat {data_dir}/shards/{{name}}"
    )
    with pytest.raises(ValueError, match="refusing shard name"):
        module.split_shards("train")
    with pytest.raises(ValueError, match="refusing shard name"):
        listed_shard_paths(data_dir)
    assert not marker.exists()


def test_a_path_escape_never_reads_shards_outside_the_folder(tmp_path: Path) -> None:
    data_dir = write_tiny_shards(tmp_path / "data", {"train": [2], "val": [2]})
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(data_dir / "shards" / "train-000000.tar", outside / "train-000000.tar")
    rename_first_shard(data_dir, "train", "../../outside/train-000000.tar")
    module = ModalityDataModule(str(data_dir), prepare_dataset=None)
    with pytest.raises(ValueError, match=r"\.\./\.\./outside"):
        module.split_shards("train")


def test_is_prepared_refuses_a_summary_whose_shard_names_escape_the_folder(tmp_path: Path) -> None:
    """is_prepared walks the summary as training does (listing.listed_shard_paths): a listed path outside
    shards/ that exists is not a finished prepare run."""
    data_dir = write_tiny_shards(tmp_path / "data", {"train": [2], "val": [2]})
    assert is_prepared(data_dir)
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(data_dir / "shards" / "train-000000.tar", outside / "train-000000.tar")
    rename_first_shard(data_dir, "train", "../../outside/train-000000.tar")
    assert (data_dir / "shards" / "../../outside/train-000000.tar").is_file()
    assert not is_prepared(data_dir)


def test_local_shards_are_opened_as_files_not_through_a_shell(tmp_path: Path) -> None:
    data_dir = write_tiny_shards(tmp_path / "data", {"train": [2, 3], "val": [2]})
    shards = ModalityDataModule(str(data_dir), prepare_dataset=None).split_shards("train")
    assert shards.urls == tuple(str(data_dir / "shards" / f"train-00000{i}.tar") for i in range(2))
    assert all(local_path_of(url) == url for url in shards.urls)  # the fast stage opens the file itself


def test_listed_shard_paths_are_the_summary_shards_and_readable(tmp_path: Path) -> None:
    data_dir = write_tiny_shards(tmp_path / "data", {"train": [2, 3], "val": [2], "test": [1]})
    (data_dir / "shards" / "stray; rm -rf x.tar").write_bytes(b"")  # not listed: never read
    paths = listed_shard_paths(data_dir)
    assert [p.name for p in paths] == [
        "test-000000.tar",
        "train-000000.tar",
        "train-000001.tar",
        "val-000000.tar",
    ]
    assert sum(1 for p in paths for _ in read_shard_samples(p)) == 8


def test_audit_reads_only_files_named_as_the_writer_names_them(tmp_path: Path) -> None:
    data_dir = write_tiny_shards(tmp_path / "data", {"train": [2], "val": [2]})
    for odd in ("x;touch y.tar", "train-1.tar", "..tar"):
        (data_dir / "shards" / odd).write_bytes(b"")
    (data_dir / "shards" / "test-000000.tar").mkdir()  # a folder with a shard's name is no shard
    assert [p.name for p in find_shards(data_dir)] == ["train-000000.tar", "val-000000.tar"]

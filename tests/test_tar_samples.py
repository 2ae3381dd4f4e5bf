"""The fast tar stage yields exactly what stock webdataset yields, and fails loudly on damaged shards."""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

import pytest
import webdataset as wds

from modality.data.tar_samples import (
    ShardFormatError,
    index_tar,
    local_path_of,
    split_key_ext,
    tar_samples,
    tarfile_to_samples,
)

LONG_DIR = "series-" + "x" * 120 + "/"


def _members(n_samples: int, seed: int = 0) -> list[tuple[str, bytes]]:
    members = []
    for i in range(n_samples):
        key = f"{seed:04x}{i:016x}"
        members += [
            (f"{key}.png", bytes((i * 7 + j) % 256 for j in range(300 + 97 * i))),
            (f"{key}.cls", str(i % 4).encode()),
            (f"{key}.json", b'{"dataset": "site_a"}'),
        ]
    return members


AWKWARD_MEMBERS = [
    (LONG_DIR + "slice.0001.PNG", b"long name, upper-case extension" * 10),  # > 100 chars: GNU L / pax path
    (LONG_DIR + "slice.0001.cls", b"2"),
    ("ünïcödé-ключ.txt", b"non-ASCII name"),
    ("__meta__", b"webdataset skips these"),
    ("__dir__/x.txt", b"and these"),
    ("nodot", b"belongs to no sample"),
    (".hidden", b"nor this"),
    ("a.b/c.d", b"key a.b/c, extension d"),
    ("dir/.x", b"regex corner case"),
    ("empty.bin", b""),
    ("exactly512.bin", b"z" * 512),
]


def write_tar(path: Path, members: list[tuple[str, bytes]], tar_format: int = tarfile.GNU_FORMAT) -> Path:
    with tarfile.open(path, "w", format=tar_format) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            tar.addfile(info, io.BytesIO(data))
    return path


def stock(urls: list[str], **kwargs) -> list[dict]:
    return list(wds.tarfile_samples(iter([{"url": url} for url in urls]), **kwargs))


def fast(urls: list[str], **kwargs) -> list[dict]:
    return list(tar_samples(iter([{"url": url} for url in urls]), **kwargs))


@pytest.mark.parametrize("tar_format", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_same_samples_as_stock_webdataset(tmp_path: Path, tar_format: int) -> None:
    members = _members(5) + AWKWARD_MEMBERS + _members(3, seed=1)
    if tar_format == tarfile.USTAR_FORMAT:  # ustar cannot store non-ASCII names or > 155-char prefixes
        members = [(name, data) for name, data in members if name.isascii()]
    shard = write_tar(tmp_path / "shard.tar", members, tar_format)
    expected = stock([str(shard)])
    got = fast([str(shard)])
    assert got == expected
    awkward_samples = 5 if tar_format == tarfile.USTAR_FORMAT else 6  # those that belong to a sample
    assert len(got) == 5 + 3 + awkward_samples
    long_sample = next(sample for sample in got if sample["__key__"] == LONG_DIR + "slice")
    assert set(long_sample) == {"__key__", "__url__", "0001.png", "0001.cls"}


def test_same_samples_as_stock_for_webdataset_writer_and_several_shards(tmp_path: Path) -> None:
    urls = []
    for shard_index in range(3):
        path = tmp_path / f"train-{shard_index:06d}.tar"
        with wds.TarWriter(str(path)) as writer:
            for i in range(4):
                writer.write(
                    {"__key__": f"{shard_index:04x}{i:016x}", "png": b"p" * (i + 1), "cls": str(i).encode()}
                )
        urls.append(str(path))
    # The same key at the end of one shard and the start of the next must stay two samples.
    write_tar(tmp_path / "dup.tar", [("0002000000000000000003.json", b"{}")])
    urls.append(str(tmp_path / "dup.tar"))
    assert fast(urls) == stock(urls)


def test_select_and_rename_files_like_stock(tmp_path: Path) -> None:
    shard = str(write_tar(tmp_path / "shard.tar", _members(4)))
    select = {"select_files": lambda name: not name.endswith(".json")}
    rename = {"rename_files": lambda name: name.replace(".png", ".image.png")}
    assert fast([shard], **select) == stock([shard], **select)
    assert fast([shard], **rename) == stock([shard], **rename)
    assert all("json" not in sample for sample in fast([shard], **select))


def test_drop_in_inside_a_webdataset_pipeline(tmp_path: Path) -> None:
    shard = str(write_tar(tmp_path / "shard.tar", _members(6)))
    pipeline = wds.DataPipeline(
        wds.SimpleShardList([shard]), tarfile_to_samples(), wds.to_tuple("cls", "png")
    )
    stock_pipeline = wds.DataPipeline(
        wds.SimpleShardList([shard]), wds.tarfile_to_samples(), wds.to_tuple("cls", "png")
    )
    assert list(pipeline) == list(stock_pipeline)


def test_non_local_and_compressed_shards_go_to_stock_webdataset(tmp_path: Path) -> None:
    shard = write_tar(tmp_path / "shard.tar", _members(3))
    gzipped = tmp_path / "shard.tar.gz"
    gzipped.write_bytes(gzip.compress(shard.read_bytes()))
    for url in (f"pipe:cat {shard}", str(gzipped), f"file://{shard}"):
        assert fast([url]) == stock([url]), url
    assert local_path_of("pipe:cat x.tar") is None
    assert local_path_of("https://host/x.tar") is None
    assert local_path_of("file:///data/x.tar") == "/data/x.tar"
    assert local_path_of("/data/x.tar") == "/data/x.tar"


def test_key_split_matches_webdataset() -> None:
    names = ["abc.png", "abc.seg.png", "d/e.f/g.h.i", ".x", "noext", "a/.b", "x/y", "k.", "__k__.json"]
    for name in names:
        assert split_key_ext(name) == wds.tariterators.base_plus_ext(name), name


@pytest.mark.timeout(30)
def test_truncated_shard_raises_clear_error(tmp_path: Path) -> None:
    whole = write_tar(tmp_path / "whole.tar", _members(4)).read_bytes()
    members = index_tar(whole)
    inside_data = members[3].data_offset + 10
    cut_points = {
        "inside member data": inside_data,
        "inside a header": members[3].data_offset - 200,
        "at a member boundary, no end-of-archive block": members[3].data_offset - 512,
    }
    for what, cut in cut_points.items():
        path = tmp_path / f"cut-{cut}.tar"
        path.write_bytes(whole[:cut])
        with pytest.raises(ShardFormatError, match="truncated") as error:
            fast([str(path)])
        assert str(path) in str(error.value), what


@pytest.mark.timeout(30)
def test_damaged_shards_are_reported_and_handler_decides(tmp_path: Path) -> None:
    good = write_tar(tmp_path / "good.tar", _members(2))
    corrupt = bytearray(good.read_bytes())
    second_header = index_tar(bytes(corrupt))[1].data_offset - 512
    corrupt[second_header + 10] ^= 0xFF  # a byte of the member name: the header checksum no longer matches
    (tmp_path / "corrupt.tar").write_bytes(bytes(corrupt))
    (tmp_path / "empty.tar").write_bytes(b"")
    with pytest.raises(ShardFormatError, match="checksum"):
        fast([str(tmp_path / "corrupt.tar")])
    with pytest.raises(ShardFormatError, match="empty"):
        fast([str(tmp_path / "empty.tar")])
    with pytest.raises(FileNotFoundError):
        fast([str(tmp_path / "missing.tar")])
    # Stock convention: a handler returning True skips the bad shard and goes on with the next one.
    seen: list[Exception] = []
    urls = [str(tmp_path / name) for name in ("corrupt.tar", "empty.tar", "good.tar")]
    samples = fast(urls, handler=lambda exn: seen.append(exn) or True)
    assert [sample["__url__"] for sample in samples] == [str(good)] * 2
    assert len(seen) == 2


def test_duplicate_member_raises_like_stock(tmp_path: Path) -> None:
    shard = str(write_tar(tmp_path / "dup.tar", [("k.png", b"a"), ("k.png", b"b")]))
    with pytest.raises(ValueError, match="duplicate"):
        stock([shard])
    with pytest.raises(ValueError, match="duplicate"):
        fast([shard])

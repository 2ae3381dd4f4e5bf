"""The tar writer: normalised headers, rotation, atomic rename, and readability by tar and webdataset."""

from __future__ import annotations

import hashlib
import io
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest

from modality.shards.stats import histogram_stats, uint8_histogram, uint8_histogram_counts
from modality.shards.writer import ShardWriter, sample_key


def write_samples(directory: Path, n: int, max_samples: int) -> list[dict]:
    with ShardWriter(directory, "train", max_samples) as writer:
        for i in range(n):
            key = sample_key("site", f"/x/{i}.dcm", 0)
            writer.write(key, [("cls", str(i % 4).encode()), ("json", b"{}")])
    return [{"name": s.name, "samples": s.samples} for s in writer.shards]


def test_keys_are_20_hex_digits_and_distinct() -> None:
    keys = {sample_key("d", f"p{i}", j) for i in range(50) for j in range(4)}
    assert len(keys) == 200
    assert all(len(k) == 20 and set(k) <= set("0123456789abcdef") for k in keys)


def test_rotation_names_and_normalised_headers(tmp_path: Path) -> None:
    shards = write_samples(tmp_path, 5, 2)
    assert shards == [
        {"name": "train-000000.tar", "samples": 2},
        {"name": "train-000001.tar", "samples": 2},
        {"name": "train-000002.tar", "samples": 1},
    ]
    assert not list(tmp_path.glob("*.partial"))
    with tarfile.open(tmp_path / "train-000000.tar") as tar:
        members = tar.getmembers()
    assert len(members) == 4
    for m in members:
        assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o444)


def test_same_samples_give_byte_identical_shards(tmp_path: Path) -> None:
    write_samples(tmp_path / "a", 7, 3)
    write_samples(tmp_path / "b", 7, 3)
    for path in sorted((tmp_path / "a").iterdir()):
        assert (
            hashlib.sha256(path.read_bytes()).digest()
            == hashlib.sha256((tmp_path / "b" / path.name).read_bytes()).digest()
        )


def _tarfile_reference(samples: list[tuple[str, list[tuple[str, bytes]]]]) -> bytes:
    """What :mod:`tarfile` writes for the same members with the normalised header fields."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for ext, payload in members:
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode, info.uid, info.gid = len(payload), 0, 0o444, 0, 0
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


@pytest.mark.parametrize("sizes", [[0, 1, 511, 512, 513], [20_000, 3, 700], [9_999] * 7])
def test_headers_and_padding_are_what_tarfile_writes(tmp_path: Path, sizes: list[int]) -> None:
    rng = np.random.default_rng(len(sizes))
    samples = [
        (sample_key("d", f"p{i}", 0), [("png", rng.bytes(size)), ("cls", b"2"), ("json", b'{"a": 1}')])
        for i, size in enumerate(sizes)
    ]
    with ShardWriter(tmp_path, "test", 100) as writer:
        for key, members in samples:
            writer.write(key, members)
    written = (tmp_path / "test-000000.tar").read_bytes()
    assert written == _tarfile_reference(samples)
    assert len(written) % (20 * 512) == 0
    with tarfile.open(tmp_path / "test-000000.tar") as tar:  # tarfile checks each header's checksum
        names = tar.getnames()
        assert tar.extractfile(f"{samples[0][0]}.png").read() == samples[0][1][0][1]
    assert names == [f"{key}.{ext}" for key, members in samples for ext, _ in members]


def test_member_names_that_do_not_fit_a_ustar_header_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="1-100 bytes"), ShardWriter(tmp_path, "train", 5) as writer:
        writer.write("k" * 100, [("png", b"x")])
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_no_shard_behind(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), ShardWriter(tmp_path, "val", 10) as writer:
        writer.write("0" * 20, [("cls", b"1")])
        raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []


def test_tar_cli_lists_members(tmp_path: Path) -> None:
    write_samples(tmp_path, 2, 10)
    listing = subprocess.run(
        ["tar", "-tf", str(tmp_path / "train-000000.tar")], capture_output=True, text=True, check=True
    ).stdout.split()
    assert len(listing) == 4 and all(name.endswith((".cls", ".json")) for name in listing)


def test_histogram_stats_match_numpy_float64() -> None:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (31, 17), dtype=np.uint8) for _ in range(5)]
    images.append(np.full((9, 9), 255, np.uint8))
    histogram = sum(uint8_histogram(img) for img in images)
    stats = histogram_stats(histogram)
    everything = np.concatenate([img.ravel() for img in images]).astype(np.float64)
    assert stats["pixels"] == everything.size
    assert stats["mean"] == pytest.approx(everything.mean(), rel=1e-12)
    assert stats["std"] == pytest.approx(everything.std(), rel=1e-12)
    assert stats["mean01"] == pytest.approx(everything.mean() / 255, rel=1e-12)


def test_uint8_histogram_counts_like_bincount_for_every_layout() -> None:
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (224, 224), dtype=np.uint8)
    for view in (image, image[::3, 1::2], image.T, image[:1], image.reshape(-1), np.zeros((0, 4), np.uint8)):
        counts = uint8_histogram(view)
        assert counts.dtype == np.int64 and counts.shape == (256,)
        np.testing.assert_array_equal(counts, np.bincount(view.ravel(), minlength=256))
        as_list = uint8_histogram_counts(view)  # what a work-cache entry records: plain ints
        assert as_list == counts.tolist() and {type(c) for c in as_list} == {int}
    with pytest.raises(TypeError):
        uint8_histogram(image.astype(np.int16))


def test_histogram_stats_of_nothing_are_none() -> None:
    assert histogram_stats([0] * 256)["mean"] is None


def test_npy_member_roundtrip() -> None:
    from modality.shards.work import encode_member

    image = np.arange(64, dtype=np.uint8).reshape(8, 8)
    loaded = np.load(io.BytesIO(encode_member(image, "npy")), allow_pickle=False)
    assert np.array_equal(loaded, image)
    from PIL import Image

    png = np.asarray(Image.open(io.BytesIO(encode_member(image, "png"))))
    assert np.array_equal(png, image)


def idat_rows(data: bytes, height: int, width: int) -> np.ndarray:
    """The inflated, still filtered rows of a single-IDAT PNG (filter byte first in each row)."""
    pos = 8
    while True:
        length, kind = struct.unpack_from(">I4s", data, pos)
        if kind == b"IDAT":
            raw = zlib.decompress(data[pos + 8 : pos + 8 + length])
            return np.frombuffer(raw, np.uint8).reshape(height, width + 1)
        pos += length + 12


def test_png_members_are_up_filtered_and_read_by_the_loader_fast_path() -> None:
    """Members come from the one encoder (modality.shards.png_codec) and decode through PIL and the loader."""
    from PIL import Image

    from modality.shards.png_codec import decode_png_grey
    from modality.shards.work import encode_member

    rng = np.random.default_rng(3)
    for shape in [(224, 224), (1, 7), (13, 1), (31, 17)]:
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        image[: shape[0] // 2] = 0  # runs of background, as real slices have
        data = encode_member(image, "png")
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), image)
        assert np.array_equal(decode_png_grey(data), image)
        assert encode_member(image, "png") == data  # deterministic
        assert (idat_rows(data, *shape)[:, 0] == 2).all()  # every row Up-filtered


def test_prepare_imports_the_png_codec_without_the_training_stack() -> None:
    code = (
        "import sys, modality.shards.build, modality.shards.work; "
        "assert not {'torch', 'pytorch_lightning'} & set(sys.modules), 'training stack imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)

"""A fast local tar -> samples stage, a drop-in for ``webdataset.tarfile_to_samples()``.

Stock webdataset walks each shard with :mod:`tarfile` in stream mode, which builds a ``TarInfo`` object,
re-reads and re-validates each 512-byte header in Python and copies member data through a file object:
measured here at 0.12-0.18 ms of CPU per sample, more than the whole budget of the raw (npy) loader path.
This stage memory-maps a local shard, walks the ustar headers with one ``struct`` call each, validates
all header checksums at once with numpy, and slices member data straight out of the mapping.

It yields exactly what stock webdataset yields (same keys, members, bytes, grouping, per-shard
boundaries, ``__url__`` / ``__local_path__``), so a pipeline can swap one line. What it does not parse
itself (URLs that are not local files, compressed tars, GNU sparse members) goes to stock webdataset.

Stricter than stock on purpose: :mod:`tarfile` silently ends a shard at a bad checksum or a header cut
short, so a damaged shard quietly loses samples. Here a truncated or corrupt shard raises
:class:`ShardFormatError` naming the file and offset (routed through ``handler`` like any stock error),
and a damaged shard contributes no samples at all, because the whole header walk happens before the
first sample is yielded.
"""

from __future__ import annotations

import mmap
import re
import struct
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import numpy as np
import webdataset as wds
from webdataset.filters import pipelinefilter
from webdataset.handlers import reraise_exception

BLOCK_SIZE = 512

# name, (mode uid gid), size, (mtime), chksum, typeflag, (linkname magic version uname gname devs), prefix
_HEADER = struct.Struct("100s24x12s12x8sc188x155s12x")

_REGULAR_TYPES = frozenset((b"0", b"\0", b"7"))  # tarfile.REGULAR_TYPES minus GNU sparse
# Types tarfile knows: their size field is NOT followed by data blocks (hard/symlinks, dirs, devices).
_NO_DATA_TYPES = frozenset((b"1", b"2", b"3", b"4", b"5", b"6"))
_GNU_LONG_NAME = b"L"
_GNU_LONG_LINK = b"K"
_GNU_SPARSE = b"S"
_PAX_LOCAL_TYPES = frozenset((b"x", b"X"))  # X: Solaris' name for the same thing
_PAX_GLOBAL = b"g"
_GNU_TYPES = frozenset((_GNU_LONG_NAME, _GNU_LONG_LINK, _GNU_SPARSE))

# Magic numbers of the compressions tarfile's "r|*" mode would unwrap: gzip, bzip2, xz, zstd.
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd")

# webdataset's rules, kept identical: key = directory + basename up to its first dot.
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_SKIP_META = re.compile(r"__[^/]*__($|/)")
_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_PAX_RECORD = re.compile(rb"(\d+) ([^=]+)=")


class ShardFormatError(ValueError):
    """A local shard that is not a readable tar (truncated, bad header checksum, empty)."""


class _NeedsStockReader(Exception):
    """A valid tar feature this stage does not parse itself; the shard goes to stock webdataset."""


class TarMember(NamedTuple):
    """A regular file inside a tar: its (pax/GNU-resolved) name and where its bytes lie.

    A NamedTuple rather than a frozen dataclass: one is built per member, and that is 4x cheaper.
    """

    name: str
    data_offset: int
    size: int


def local_path_of(url: str) -> str | None:
    """The filesystem path a shard URL names, or None when stock webdataset must open it (http, pipe:, -)."""
    if url.startswith("file:"):
        return re.sub(r"^file://?", "", url)
    if url == "-" or url.startswith("pipe:") or _URL_SCHEME.match(url):
        return None
    return url


def split_key_ext(name: str) -> tuple[str | None, str | None]:
    """Split a member name into sample key and extension exactly like ``webdataset.base_plus_ext``.

    The common case (no directory) avoids the regex: without a slash the key is everything before the
    first dot, and a name without a dot or starting with one belongs to no sample.
    """
    if "/" not in name:
        dot = name.find(".")
        if dot <= 0:
            return None, None
        return name[:dot], name[dot + 1 :]
    match = _KEY_EXT.match(name)
    if not match:
        return None, None
    return match.group(1), match.group(2)


def _round_up_to_block(size: int) -> int:
    return (size + BLOCK_SIZE - 1) // BLOCK_SIZE * BLOCK_SIZE


def _null_terminated(field: bytes) -> str:
    end = field.find(b"\0")
    if end != -1:
        field = field[:end]
    # tarfile's default: the filesystem encoding (UTF-8 here) with surrogateescape.
    return field.decode("utf-8", "surrogateescape")


def _raise_truncated(
    buffer: Any, header_offsets: list[int], stored: list[int], source: str, pos: int, size: int
) -> None:
    """A member overruns the file: blame a garbled header (bad checksum) before blaming truncation."""
    _validate_checksums(buffer, header_offsets, stored, source)
    left = len(buffer) - pos - BLOCK_SIZE
    raise ShardFormatError(f"{source}: truncated tar: member at offset {pos} needs {size} bytes, {left} left")


def _tar_number(field: bytes, source: str, pos: int) -> int:
    """A tar numeric field: octal text, or GNU base-256 when the high bit of the first byte is set."""
    if field[0] in (0o200, 0o377):
        value = int.from_bytes(field[1:], "big")
        if field[0] == 0o377:
            value -= 256 ** (len(field) - 1)
        return value
    end = field.find(b"\0")
    text = (field[:end] if end != -1 else field).strip()
    try:
        return int(text or b"0", 8)
    except ValueError:
        raise ShardFormatError(
            f"{source}: invalid numeric tar header field {field!r} at offset {pos}"
        ) from None


def _parse_pax_records(payload: bytes, source: str, pos: int) -> dict[str, str]:
    """POSIX pax records ``"<len> <key>=<value>\\n"``; keys and values are UTF-8 by the standard."""
    records: dict[str, str] = {}
    pos = 0
    while True:
        match = _PAX_RECORD.match(payload, pos)
        if not match:
            return records
        length = int(match.group(1))
        if length == 0:
            raise ShardFormatError(f"{source}: pax record of length 0 at offset {pos}")
        key = match.group(2).decode("utf-8", "surrogateescape")
        value = payload[match.end(2) + 1 : match.start(1) + length - 1]
        records[key] = value.decode("utf-8", "surrogateescape")
        pos += length


def _validate_checksums(buffer: Any, header_offsets: list[int], stored: list[int], source: str) -> None:
    """Check every header's checksum in one numpy pass (a Python ``sum`` per header would double the cost).

    Like tarfile, accept the unsigned or the signed-char sum (old Sun and NeXT tars used signed chars).
    """
    if not header_offsets:
        return
    n_blocks = len(buffer) // BLOCK_SIZE
    blocks = np.frombuffer(buffer, dtype=np.uint8, count=n_blocks * BLOCK_SIZE).reshape(n_blocks, BLOCK_SIZE)
    try:
        rows = blocks[np.asarray(header_offsets) // BLOCK_SIZE]
    finally:
        del blocks  # release the export of the mmap so it can be closed
    expected = np.asarray(stored, dtype=np.int64)
    # At most 512 * 255 per header: 32-bit accumulators suffice and sum twice as fast as 64-bit ones.
    unsigned = rows.sum(axis=1, dtype=np.uint32) - rows[:, 148:156].sum(axis=1, dtype=np.uint32) + 8 * 32
    bad = unsigned != expected
    if bad.any():
        signed_rows = rows.view(np.int8)
        signed = (
            signed_rows.sum(axis=1, dtype=np.int32)
            - signed_rows[:, 148:156].sum(axis=1, dtype=np.int32)
            + 256
        )
        bad &= signed != expected
        if bad.any():
            first = header_offsets[int(np.argmax(bad))]
            raise ShardFormatError(f"{source}: bad tar header checksum at offset {first}")


def index_tar(buffer: Any, source: str = "<buffer>") -> list[TarMember]:
    """Every regular file of an uncompressed tar held in ``buffer`` (bytes, mmap), in archive order.

    Resolves GNU long names and pax ``path``/``size`` records as :mod:`tarfile` does. Raises
    :class:`ShardFormatError` for an empty, truncated or corrupt archive (including one that stops at a
    member boundary without the end-of-archive block, the signature of a copy cut short).
    """
    end = len(buffer)
    if end == 0:
        raise ShardFormatError(f"{source}: empty file")
    if any(bytes(buffer[: len(magic)]) == magic for magic in _COMPRESSED_MAGIC):
        raise _NeedsStockReader("compressed tar")
    unpack = _HEADER.unpack_from
    members: list[TarMember] = []
    header_offsets: list[int] = []
    stored_checksums: list[int] = []
    global_pax: dict[str, str] = {}
    local_pax: dict[str, str] = {}
    long_name: str | None = None
    pos = 0
    try:
        while True:
            if pos + BLOCK_SIZE > end:
                detail = "no end-of-archive block" if pos == end else "header cut short"
                raise ShardFormatError(f"{source}: truncated tar at offset {pos} ({detail})")
            name_field, size_field, checksum_field, typeflag, prefix_field = unpack(buffer, pos)
            if name_field[0] == 0 and bytes(buffer[pos : pos + BLOCK_SIZE]).count(0) == BLOCK_SIZE:
                break  # end-of-archive: tarfile stops at the first zero block too
            try:  # the common octal text; base-256 and odd padding take the general parser
                checksum = int(checksum_field.partition(b"\0")[0], 8)
                size = int(size_field.partition(b"\0")[0], 8)
            except ValueError:
                checksum = _tar_number(checksum_field, source, pos)
                size = _tar_number(size_field, source, pos)
            header_offsets.append(pos)
            stored_checksums.append(checksum)
            data_offset = pos + BLOCK_SIZE
            if typeflag in _REGULAR_TYPES and long_name is None and not local_pax and not global_pax:
                if data_offset + size > end:
                    _raise_truncated(buffer, header_offsets, stored_checksums, source, pos, size)
                name = name_field.partition(b"\0")[0].decode("utf-8", "surrogateescape")
                if prefix_field[0] != 0:
                    name = _null_terminated(prefix_field) + "/" + name
                if not (typeflag == b"\0" and name.endswith("/")):  # V7 directory
                    members.append(TarMember(name, data_offset, size))
                pos = data_offset + (size + BLOCK_SIZE - 1) // BLOCK_SIZE * BLOCK_SIZE
                continue
            has_data = typeflag not in _NO_DATA_TYPES
            if has_data and data_offset + size > end:
                _raise_truncated(buffer, header_offsets, stored_checksums, source, pos, size)
            if typeflag == _GNU_LONG_NAME:
                long_name = _null_terminated(bytes(buffer[data_offset : data_offset + size]))
            elif typeflag in _PAX_LOCAL_TYPES:
                local_pax.update(
                    _parse_pax_records(bytes(buffer[data_offset : data_offset + size]), source, pos)
                )
            elif typeflag == _PAX_GLOBAL:
                global_pax.update(
                    _parse_pax_records(bytes(buffer[data_offset : data_offset + size]), source, pos)
                )
            elif typeflag == _GNU_SPARSE:
                raise _NeedsStockReader("GNU sparse member")
            elif typeflag == _GNU_LONG_LINK:
                pass  # a link target: links are not samples
            else:
                pax = {**global_pax, **local_pax} if (global_pax or local_pax) else None
                if pax is not None and any(key.startswith("GNU.sparse.") for key in pax):
                    raise _NeedsStockReader("GNU sparse member (pax)")
                if pax is not None and "size" in pax:
                    try:
                        size = int(pax["size"])
                    except ValueError:
                        size = 0
                    if has_data and data_offset + size > end:
                        _raise_truncated(buffer, header_offsets, stored_checksums, source, pos, size)
                if typeflag in _REGULAR_TYPES:
                    name = _member_name(name_field, prefix_field, typeflag, long_name, pax)
                    if not (typeflag == b"\0" and name.endswith("/")):  # V7 directory
                        members.append(TarMember(name, data_offset, size))
                long_name = None
                local_pax = {}
            pos = data_offset + (_round_up_to_block(size) if has_data else 0)
    except (ShardFormatError, _NeedsStockReader):
        raise
    except Exception as exn:  # struct/decoding surprises on a damaged file: say which file and where
        raise ShardFormatError(f"{source}: unreadable tar header at offset {pos}: {exn}") from exn
    _validate_checksums(buffer, header_offsets, stored_checksums, source)
    return members


def _member_name(
    name_field: bytes,
    prefix_field: bytes,
    typeflag: bytes,
    long_name: str | None,
    pax: dict[str, str] | None,
) -> str:
    if pax is not None and "path" in pax:
        return pax["path"].rstrip("/")
    if long_name is not None:
        return long_name
    name = _null_terminated(name_field)
    if prefix_field[0] != 0 and typeflag not in _GNU_TYPES:
        name = _null_terminated(prefix_field) + "/" + name
    return name


def _is_meta_name(name: str) -> bool:
    """webdataset skips ``__...__`` members (its own metadata); mirror both of its tests."""
    if not name.startswith("__"):
        return False
    return ("/" not in name and name.endswith("__")) or _SKIP_META.match(name) is not None


def _samples_of_buffer(
    buffer: Any,
    members: list[TarMember],
    url: str,
    local_path: str | None,
    select_files: Callable[[str], bool] | None,
    rename_files: Callable[[str], str] | None,
) -> Iterator[dict[str, Any]]:
    """Group consecutive members by key, as ``webdataset.group_by_keys`` does within one shard."""
    current: dict[str, Any] | None = None
    current_key = None
    for name, data_offset, size in members:
        if name[:2] == "__" and _is_meta_name(name):
            continue
        if rename_files is not None:
            name = rename_files(name)
        if select_files is not None and not select_files(name):
            continue
        dot = name.find(".")
        if dot > 0 and "/" not in name:  # inline split_key_ext for the usual flat name
            key, ext = name[:dot], name[dot + 1 :]
        else:
            key, ext = split_key_ext(name)
            if key is None:
                continue
        ext = ext.lower()  # type: ignore[union-attr]
        if key != current_key:
            if current is not None:
                yield current
            current = {"__key__": key, "__url__": url}
            current_key = key
        if ext in current:  # type: ignore[operator]
            raise ValueError(f"{name}: duplicate file name in tar file {ext} {current.keys()}")  # type: ignore[union-attr]
        current[ext] = buffer[data_offset : data_offset + size]  # type: ignore[index]
        if local_path is not None:
            current["__local_path__"] = local_path  # type: ignore[index]
    if current is not None:
        yield current


def _local_shard_samples(
    path: str,
    url: str,
    local_path: str | None,
    select_files: Callable[[str], bool] | None,
    rename_files: Callable[[str], str] | None,
) -> Iterator[dict[str, Any]]:
    with open(path, "rb") as handle:
        size = handle.seek(0, 2)
        if size == 0:
            raise ShardFormatError(f"{path}: empty file")
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
            members = index_tar(buffer, source=path)
            yield from _samples_of_buffer(buffer, members, url, local_path, select_files, rename_files)


def _stock_shard_samples(
    source: dict[str, Any],
    handler: Callable[[Exception], bool],
    select_files: Callable[[str], bool] | None,
    rename_files: Callable[[str], str] | None,
) -> Iterator[dict[str, Any]]:
    yield from wds.tarfile_samples(
        iter([dict(source)]), handler=handler, select_files=select_files, rename_files=rename_files
    )


def tar_samples(
    src: Iterable[dict[str, Any]],
    handler: Callable[[Exception], bool] = reraise_exception,
    select_files: Callable[[str], bool] | None = None,
    rename_files: Callable[[str], str] | None = None,
) -> Iterator[dict[str, Any]]:
    """Samples from a stream of ``{"url": ...}`` shard descriptions; same contract as ``wds.tarfile_samples``.

    ``handler`` sees every error (stock convention: return True to go on with the next shard, False to
    stop, or raise). Samples never span two shards.
    """
    for source in src:
        url = source["url"]
        path = local_path_of(url) if isinstance(url, str) else None
        if path is None:
            yield from _stock_shard_samples(source, handler, select_files, rename_files)
            continue
        try:
            yield from _local_shard_samples(path, url, source.get("local_path"), select_files, rename_files)
        except _NeedsStockReader:
            yield from _stock_shard_samples(source, handler, select_files, rename_files)
        except Exception as exn:
            exn.args = (*exn.args, url)
            if handler(exn):
                continue
            break


#: Drop-in for ``webdataset.tarfile_to_samples(handler=...)`` inside ``wds.DataPipeline``.
tarfile_to_samples = pipelinefilter(tar_samples)

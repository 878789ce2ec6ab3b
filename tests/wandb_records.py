"""Read the ``.wandb`` transaction log that W&B writes for every run, offline runs included.

wandb 0.31 dropped its Python reader (``wandb.sdk.internal.datastore``); the writer now lives in the
Go core. The format was worked out from real files and checked against every record of them:

* a 7-byte file header: ``b":W&B"``, magic ``0xBEE1`` (uint16, little-endian), version ``0``;
* then LevelDB's log format (github.com/google/leveldb/blob/main/doc/log_format.md): the file is cut
  into 32 KiB blocks counted from the start of the file (the header sits inside the first block);
  each chunk has a 7-byte header ``checksum: uint32 LE, length: uint16 LE, type: uint8`` (FULL=1,
  FIRST=2, MIDDLE=3, LAST=4) and a record never starts in a block's last 6 bytes, which are zeros;
* each reassembled payload is one protobuf ``wandb_internal_pb2.Record``.

The checksum is *not* LevelDB's masked CRC32C: it is the plain (unmasked) zlib CRC32 of the type
byte followed by the chunk's data, as the old Python datastore wrote it. Every chunk is verified, so
a reader bug or a torn file fails loudly instead of silently dropping metrics.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from wandb.proto.wandb_internal_pb2 import Record

FILE_HEADER = struct.Struct("<4sHB")
FILE_IDENT, FILE_MAGIC, FILE_VERSION = b":W&B", 0xBEE1, 0
CHUNK_HEADER = struct.Struct("<IHB")
BLOCK_SIZE = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


class WandbFileError(ValueError):
    """The file is not a complete, intact ``.wandb`` log."""


def _chunk_crc(kind: int, data: bytes) -> int:
    return zlib.crc32(data, zlib.crc32(bytes([kind])))


def _payloads(blob: bytes, path: Path) -> Iterator[bytes]:
    """Reassemble the records' bytes from the chunks, verifying each chunk's checksum."""
    if len(blob) < FILE_HEADER.size:
        raise WandbFileError(f"{path}: {len(blob)} bytes, shorter than the file header")
    ident, magic, version = FILE_HEADER.unpack_from(blob)
    if (ident, magic, version) != (FILE_IDENT, FILE_MAGIC, FILE_VERSION):
        raise WandbFileError(f"{path}: unknown file header {blob[: FILE_HEADER.size]!r}")
    offset, pending = FILE_HEADER.size, bytearray()
    in_record = False
    while offset < len(blob):
        left_in_block = BLOCK_SIZE - offset % BLOCK_SIZE
        if left_in_block < CHUNK_HEADER.size:  # the block's trailer: zero padding
            if any(blob[offset : offset + left_in_block]):
                raise WandbFileError(f"{path}: non-zero block trailer at byte {offset}")
            offset += left_in_block
            continue
        if offset + CHUNK_HEADER.size > len(blob):
            raise WandbFileError(f"{path}: truncated chunk header at byte {offset}")
        checksum, length, kind = CHUNK_HEADER.unpack_from(blob, offset)
        start = offset + CHUNK_HEADER.size
        data = blob[start : start + length]
        if len(data) != length or length > left_in_block - CHUNK_HEADER.size:
            raise WandbFileError(f"{path}: chunk at byte {offset} overruns its block or the file")
        if _chunk_crc(kind, data) != checksum:
            raise WandbFileError(f"{path}: checksum mismatch in the chunk at byte {offset}")
        offset = start + length
        if kind == FULL and not in_record:
            yield data
        elif kind == FIRST and not in_record:
            pending, in_record = bytearray(data), True
        elif kind == MIDDLE and in_record:
            pending += data
        elif kind == LAST and in_record:
            pending += data
            in_record = False
            yield bytes(pending)
        else:
            raise WandbFileError(f"{path}: chunk type {kind} out of sequence at byte {offset}")
    if in_record:
        raise WandbFileError(f"{path}: file ends inside a record")


def read_records(path: str | Path) -> list[Record]:
    """Every record of a finished ``.wandb`` file, in the order they were written."""
    path = Path(path)
    records = []
    for payload in _payloads(path.read_bytes(), path):
        record = Record()
        record.ParseFromString(payload)
        records.append(record)
    return records


def find_wandb_files(run_dir: str | Path) -> list[Path]:
    """The ``.wandb`` files of a kdlab run folder, oldest first (one per attempt)."""
    return sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))


def _key(item: Any) -> tuple[str, ...]:
    """An item's key path: ``key`` for a flat key, else ``nested_key`` (wandb 0.31 uses the latter,
    one element long for a flat key like ``train/loss``)."""
    return (item.key,) if item.key else tuple(item.nested_key)


def _set(target: dict[str, Any], path: Sequence[str], value: Any) -> None:
    for part in path[:-1]:
        target = target.setdefault(part, {})
    target[path[-1]] = value


def _remove(target: dict[str, Any], path: Sequence[str]) -> None:
    for part in path[:-1]:
        target = target.get(part, {})
    target.pop(path[-1], None)


def _apply(target: dict[str, Any], items: Iterable[Any]) -> None:
    for item in items:
        _set(target, _key(item), json.loads(item.value_json))


def history(records: Iterable[Record]) -> list[dict[str, Any]]:
    """The logged rows (each ``run.log`` call), values decoded from JSON, multi-part keys nested."""
    rows = []
    for record in records:
        if record.WhichOneof("record_type") == "history":
            row: dict[str, Any] = {}
            _apply(row, record.history.item)
            rows.append(row)
    return rows


def summary(records: Iterable[Record]) -> dict[str, Any]:
    """The run's final summary: every summary update and removal applied in order."""
    result: dict[str, Any] = {}
    for record in records:
        if record.WhichOneof("record_type") == "summary":
            _apply(result, record.summary.update)
            for item in record.summary.remove:
                _remove(result, _key(item))
    return result


def config(records: Iterable[Record]) -> dict[str, Any]:
    """The run's config: what ``wandb.init(config=...)`` put in the run record, then later updates."""
    result: dict[str, Any] = {}
    for record in records:
        kind = record.WhichOneof("record_type")
        block = record.run.config if kind == "run" else record.config if kind == "config" else None
        if block is not None:
            _apply(result, block.update)
            for item in block.remove:
                _remove(result, _key(item))
    return result


def run_info(records: Iterable[Record]) -> dict[str, Any]:
    """Name, group, job type and tags of the run, from its (first) run record."""
    for record in records:
        if record.WhichOneof("record_type") == "run":
            run = record.run
            return {"name": run.display_name, "group": run.run_group, "job_type": run.job_type, "tags": list(run.tags)}
    raise WandbFileError("no run record")

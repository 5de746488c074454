"""Per-sample records: JSON lines appended one at a time with flush + fsync, read back tolerantly.

A run killed while writing leaves at most a torn last line (no trailing newline). Readers ignore it;
`RecordWriter` cuts it off before appending, so the next record starts on a clean line.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator

logger = logging.getLogger(__name__)


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All complete records of a JSONL file. A torn last line is skipped; a bad line elsewhere raises."""
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    torn = lines.pop()  # text after the last newline: b"" for a complete file
    if torn.strip():
        logger.warning("%s: ignoring a torn last line (%d bytes) left by an interrupted run", path, len(torn))
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: line {number} is not valid JSON ({err}); the file is corrupt") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}: line {number} is not a JSON object")
        records.append(record)
    return records


class RecordWriter:
    """Appends records durably: each `write` is one line, flushed and fsynced before it returns."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._cut_torn_tail()
        self._file = open(self.path, "ab")

    def _cut_torn_tail(self) -> None:
        if not self.path.is_file():
            return
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end != len(data):
            with open(self.path, "r+b") as f:
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False, sort_keys=True, allow_nan=False) + "\n"
        self._file.write(line.encode("utf-8"))
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    def __enter__(self) -> "RecordWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def iter_record_files(run_dir: str | os.PathLike) -> Iterator[Path]:
    """The final `samples.jsonl` and every per-process shard file of a run directory."""
    run_dir = Path(run_dir)
    final = run_dir / "samples.jsonl"
    if final.is_file():
        yield final
    yield from sorted(run_dir.glob("samples.part-*.jsonl"))

"""Files written whole or not at all, and JSON-lines logs read back after a crash.

Every file dynalign writes goes through here. A write goes to a temp file in the same directory
(``.NAME.<pid>.<thread>.<ns>.tmp``), is flushed and fsynced, renamed over the target with
``os.replace`` and the directory is fsynced: a reader, a crash or a full disk sees the old file or
the new one, never part of one, and a writer that raises leaves the old file as it was and no temp
file behind. ``atomic_directory`` does the same for a directory built in place (a model).

JSON-lines logs (``metrics.jsonl``, ``prompt_ids.jsonl``, ...) are appended one record per line;
``read_jsonl`` skips a cut last line (a crash mid-append) with a warning and names the file and
line of any other line that is not JSON.

Low in the import graph: this module imports nothing from dynalign.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def fsync_directory(directory: str | os.PathLike) -> None:
    """Make a rename in ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temp path beside ``path`` for a writer that wants a path (``savefig``, ``to_parquet``);
    on a clean exit it is fsynced and renamed into place, on an exception removed."""
    path = Path(path)
    temp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.{time.monotonic_ns()}.tmp")
    try:
        yield temp
        _fsync_file(temp)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as temp, open(temp, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """An empty staging directory beside ``path`` to build a directory in; on a clean exit its
    files are fsynced and it replaces ``path`` (an earlier one is removed), on an exception it is
    removed and ``path`` stays as it was. The swap is one atomic exchange where the kernel and
    file system allow it, so a reader never finds ``path`` missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    old = None
    try:
        yield staging
        for file in staging.rglob("*"):
            if file.is_file() and not file.is_symlink():
                _fsync_file(file)
        if (path.exists() or path.is_symlink()) and exchange_paths(staging, path):
            old, staging = staging, None  # the staging name now holds the earlier directory
        else:
            if path.exists() or path.is_symlink():  # no atomic exchange here: a moment without ``path``
                old = path.with_name(f"{staging.name}.old")
                os.replace(path, old)
            try:
                os.replace(staging, path)
            except BaseException:
                if old is not None:
                    os.replace(old, path)
                    old = None
                raise
    finally:
        for leftover in (staging, old):
            if leftover is not None and (leftover.exists() or leftover.is_symlink()):
                _remove(leftover)
    fsync_directory(path.parent)


def exchange_paths(first: Path, second: Path) -> bool:
    """Swap two existing paths atomically (Linux renameat2 RENAME_EXCHANGE); False where the
    platform or file system cannot, and nothing moved."""
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange) == 0


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# JSON lines
# ---------------------------------------------------------------------------------------------

class JsonlError(ValueError):
    """A line of a JSON-lines file that is not JSON (and not a cut last line)."""

    def __init__(self, path: Path, line: int, err: json.JSONDecodeError):
        self.path, self.line, self.msg, self.colno = Path(path), line, err.msg, err.colno
        self.reason = f"line {line} is not valid JSON ({err.msg}, column {err.colno})"
        super().__init__(f"{path}: {self.reason}")


def _line(record: Any) -> str:
    return json.dumps(record) + "\n"


def append_jsonl(path: str | os.PathLike, *records: Any) -> None:
    """Append each record as one line of JSON (one write per line; the file is line-buffered)."""
    with open(path, "a", buffering=1, encoding="utf-8") as f:
        for record in records:
            f.write(_line(record))


def write_jsonl(path: str | os.PathLike, records: Iterable[Any]) -> None:
    """Replace ``path`` by ``records``, one line each, atomically."""
    atomic_write_text(path, "".join(_line(r) for r in records))


def iter_jsonl(path: str | os.PathLike, *, cut_last_line_ok: bool = True) -> Iterator[tuple[int, Any]]:
    """``(line number, record)`` of every non-blank line. A last line without its newline that is
    not JSON was cut by a crash mid-append: skipped with a warning (``cut_last_line_ok``, for the
    logs dynalign appends to), else a ``JsonlError`` like any other line that is not JSON."""
    path = Path(path)
    with path.open(encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                if cut_last_line_ok and not line.endswith("\n"):
                    log.warning("%s: line %d was cut short (a crash while it was written); skipped", path, number)
                    return
                raise JsonlError(path, number, err) from None
            yield number, record


def read_jsonl(path: str | os.PathLike, *, cut_last_line_ok: bool = True, missing_ok: bool = False) -> list[Any]:
    """Every record of a JSON-lines file (see ``iter_jsonl``); ``missing_ok``: none if it is missing."""
    if missing_ok and not Path(path).is_file():
        return []
    return [record for _, record in iter_jsonl(path, cut_last_line_ok=cut_last_line_ok)]

"""Writing outputs atomically: a file or a directory appears under its final name only when complete, under a
unique temporary name until then (two writers never share one), and replaces what was there in one rename."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

OLD = ".old"  # a directory being replaced, for the moment between its two renames


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def unique_tmp(path: Path) -> Path:
    """A temporary name beside `path` that no other writer uses: `.<name>.<random>.tmp`."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` writes the file's content to a unique temporary path, which is then flushed to disk and
    renamed to `path`; on any error the temporary file is removed and `path` is left as it was."""
    path = Path(path)
    tmp = unique_tmp(path)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


@contextlib.contextmanager
def atomic_dir(final: str | Path, tmp: Path | None = None) -> Iterator[Path]:
    """Fill the yielded temporary directory; on leaving without error it replaces `final` whole (see
    `replace_dir`), on error it is removed. `tmp` names it (default: a unique name beside `final`)."""
    final = Path(final)
    tmp = Path(tmp) if tmp is not None else unique_tmp(final)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, final)


def replace_dir(tmp: Path, final: Path) -> Path:
    """Rename the complete directory `tmp` to `final`. An existing `final` is first renamed to `final.old` and
    removed after: a kill between the two renames leaves `final.old`, which `recover_dir` puts back."""
    fsync_dir(tmp)
    old = final.with_name(final.name + OLD)
    if final.exists() or final.is_symlink():
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)
    return final


def recover_dir(final: Path) -> bool:
    """Put back `final.old` when a kill landed between the two renames of `replace_dir`; True if it did."""
    old = final.with_name(final.name + OLD)
    if not final.exists() and old.is_dir():
        os.replace(old, final)
        return True
    return False

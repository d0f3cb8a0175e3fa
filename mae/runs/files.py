"""Writing outputs atomically: a file or a directory appears under its final name only when complete, under a
unique temporary name until then (two writers never share one), and replaces what was there in one rename; and
the output directories of the commands (`OutputDir`), which never replace an input."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from mae.config import ConfigError

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


# ----------------------------------------------------------------------------------------------------------
# the output directories of the commands that write next to the user's data (predictions, embeddings, exports,
# shards): never over an input, one writer at a time, a re-run replacing its own earlier output whole

# which command wrote an output directory, and which files: what a re-run of that command may replace
OUTPUT_RECORD = ".mae-output.json"
_TMP = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$")  # unique_tmp's names: leftovers of a killed writer


class OutputError(ConfigError):
    """An output that would replace or mix with something it must not (one line, exit code 2)."""


def input_paths(spec: str | Path) -> list[Path]:
    """The files or directories behind an input as the commands take it: a path, several joined by '::', a brace
    pattern of shards (its directory); built-in data sets, `pipe:` commands and URLs have none."""
    out = []
    for part in str(spec).split("::"):
        if part.startswith("pipe:") or "://" in part:
            continue
        if "{" in part:  # shards/train-{000000..000009}.tar: the directory of the pattern
            part = os.path.dirname(part[: part.index("{")]) or "."
        if part and os.path.exists(part):
            out.append(Path(part))
    return out


def check_not_over_inputs(out: str | Path, inputs: dict[str, str | Path] | list[tuple[str, str | Path]],
                          flag: str = "OUT_DIR") -> None:  # fmt: skip
    """Refuse (OutputError) an output path that is one of the inputs, lies inside one, or holds one: outputs never
    replace inputs, and an output inside a data folder would be read as data by the next run. `inputs`: what the
    command calls each input (DATA, INPUT, SOURCE, ...) -> its path or spec, or such pairs."""
    target = Path(out).resolve()
    for label, spec in inputs.items() if isinstance(inputs, dict) else inputs:
        for p in input_paths(spec):
            src = p.resolve()
            if target == src:
                raise OutputError(f"{flag} {out} is {label} {spec} itself; write the outputs somewhere else")
            if src in target.parents:
                raise OutputError(f"{flag} {out} is inside {label} {spec}; write the outputs outside it")
            if target in src.parents:
                raise OutputError(f"{flag} {out} holds {label} {spec}; write the outputs somewhere else")


@contextlib.contextmanager
def claimed_dir(path: Path, flag: str, check: Callable[[], object]) -> Iterator[object]:
    """Hold the directory `path` (made if missing) for one writer, with the run lock of training (mae.runs.lock,
    no waiting: a second writer is refused naming the first). `check()` refuses (raising) what the directory
    holds: it runs before anything is made there and again under the lock; its result is yielded. A refused
    claim leaves nothing behind, and the lock file goes when the writer is done."""
    from mae.runs.lock import acquire, remove_if_unused

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{flag} {path} is a file, not a directory")
    created = not path.exists()
    if not created:
        check()
    try:
        lock = acquire(path, 0, name=flag, wait_key="")  # a busy directory raises OutputDirBusy (exit 2)
    except OSError as e:
        raise OutputError(f"{flag} {path} cannot be created or locked: {e.strerror or e}") from None
    try:
        yield check()
    finally:
        if lock is not None:
            lock.release(remove=True)
        if created:
            remove_if_unused(path)


class OutputDir:
    """A command's output directory, one writer at a time (the run lock of training, mae.runs.lock) and never over
    an input. Outputs are written under unique temporary names (`file(name)` gives one) and appear under their
    names at `commit()`, together: a directory holding this command's earlier output has it replaced whole,
    files the new output lacks included; any other non-empty directory is refused unless `overwrite`. On an
    error, an interruption or a kill nothing half-written is left under an output's name.

        with OutputDir(out, "mae-embed", {"DATA": data}, overwrite=opts.overwrite) as w:
            np.save(w.file("embeddings.npy"), ...)
            w.commit()
    """

    def __init__(self, path: str | Path, command: str, inputs: dict[str, str | Path], overwrite: bool = False,
                 flag: str = "OUT_DIR"):  # fmt: skip
        self.path, self.command, self.inputs = Path(path), command, inputs
        self.overwrite, self.flag = overwrite, flag
        self._tmp: dict[str, Path] = {}  # output name -> its temporary file
        self._staging: list[Path] = []
        self._sources: dict[str, str] = {}  # output name -> the input it comes from (to name a collision)

    def __enter__(self) -> OutputDir:
        check_not_over_inputs(self.path, self.inputs, self.flag)
        self._claim = claimed_dir(self.path, self.flag, self._previous_output)
        self.previous = self._claim.__enter__()
        try:
            self._remove_leftovers()
        except BaseException:
            self._claim.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        for tmp in self._tmp.values():
            tmp.unlink(missing_ok=True)
        for d in self._staging:
            shutil.rmtree(d, ignore_errors=True)
        self._prune_empty_dirs(self._tmp)
        self._claim.__exit__(None, None, None)

    def reserve(self, name: str, source: str) -> None:
        """Claim the output `name` (relative to the directory) for the input `source`; a name claimed for another
        input raises OutputError naming both, before anything is written."""
        first = self._sources.setdefault(name, source)
        if first != source:
            raise OutputError(
                f"{first} and {source} would both be written as {self.path / name}; rename one of them"
            )

    def file(self, name: str, source: str | None = None) -> Path:
        """A unique temporary path for the output `name` (subfolders are made); it takes that name at commit()
        if it was written. A name another input has (`reserve`) raises OutputError."""
        self.reserve(name, source or self._sources.get(name, name))
        if name not in self._tmp:
            final = self.path / name
            final.parent.mkdir(parents=True, exist_ok=True)
            self._tmp[name] = unique_tmp(final)
        return self._tmp[name]

    def staging(self) -> Path:
        """A temporary folder in the directory for a writer that makes its files itself (a library's
        save_pretrained); `adopt` makes outputs of what it holds."""
        folder = unique_tmp(self.path / "staging")
        folder.mkdir()
        self._staging.append(folder)
        return folder

    def adopt(self, folder: Path) -> None:
        """Every file under `folder` (a `staging` folder) becomes the output of its relative path."""
        for f in sorted(p for p in folder.rglob("*") if p.is_file()):
            rel = f.relative_to(folder).as_posix()
            os.replace(f, self.file(rel, source=rel))

    def commit(self) -> list[Path]:
        """Give every output its name, remove the earlier output's other files, and record what was written.
        The record lists old and new files while they are swapped, so a kill at any moment leaves a directory a
        re-run may replace."""
        names = sorted(n for n, tmp in self._tmp.items() if tmp.exists())
        self._record(sorted(set(names) | set(self.previous)))
        for name in names:
            with open(self._tmp[name], "rb+") as f:
                os.fsync(f.fileno())
            os.replace(self._tmp.pop(name), self.path / name)
        stale = sorted(set(self.previous) - set(names))
        for name in stale:
            (self.path / name).unlink(missing_ok=True)
        self._record(names)
        self._prune_empty_dirs(stale)
        fsync_dir(self.path)
        return [self.path / n for n in names]

    # ---- what is there

    def _previous_output(self) -> list[str]:
        """The files of this command's earlier output here (to replace). Anything else refuses the directory,
        unless `overwrite`."""
        from mae.runs.lock import LOCK_FILE

        record = self._read_record()
        if record is not None and record.get("command") != self.command and not self.overwrite:
            raise OutputError(f"{self.flag} {self.path} holds the output of {record.get('command')}; choose "
                              "another directory, or pass --overwrite to replace it")  # fmt: skip
        previous = list(record.get("files", [])) if record is not None else []
        ours = {*previous, OUTPUT_RECORD, LOCK_FILE}
        for p in sorted(self.path.rglob("*")):
            rel = p.relative_to(self.path).as_posix()
            if p.is_dir() or rel in ours or _TMP.match(p.name) or self.overwrite:
                continue
            raise OutputError(
                f"{self.flag} {self.path} is not empty ({rel} is not an earlier output of {self.command}); "
                "choose an empty or new directory, or pass --overwrite to write into it"
            )
        return previous

    def _read_record(self) -> dict | None:
        path = self.path / OUTPUT_RECORD
        try:
            record = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {"command": "an unknown command", "files": []}
        return record if isinstance(record, dict) else {"command": "an unknown command", "files": []}

    def _record(self, names: list[str]) -> None:
        atomic_text(
            self.path / OUTPUT_RECORD, json.dumps({"command": self.command, "files": names}, indent=1)
        )

    def _remove_leftovers(self) -> None:
        for p in sorted(self.path.rglob("*.tmp")):
            if _TMP.match(p.name) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            elif _TMP.match(p.name):
                p.unlink(missing_ok=True)

    def _prune_empty_dirs(self, names) -> None:
        """The subfolders of `names` left empty (made for outputs never committed, or of a replaced output)."""
        for name in names:
            d = (self.path / name).parent
            while d != self.path and self.path in d.parents:
                try:
                    d.rmdir()
                except OSError:
                    break
                d = d.parent

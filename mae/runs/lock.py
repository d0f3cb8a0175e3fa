"""One run per output directory: an exclusive lock on `output_dir/run.lock` for the run's lifetime.

Two runs in one directory would interleave their metrics rows and overwrite each other's checkpoints: a
user launching twice, two SLURM jobs with the same --job-name, or a requeued job starting while the
previous one still writes its last checkpoint. The lock is a POSIX record lock (`fcntl.lockf`): the
kernel drops it when its process dies, however it dies, so a killed run never leaves a stale lock; it
works across hosts on NFS (v3 via lockd, v4 natively), GPFS and Lustre mounted with `flock`; and, unlike
`flock`, it is not inherited by forked data workers, which would otherwise keep it alive after the trainer.
A POSIX lock is per process, so nothing else in the process may open and close this file while it runs.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from datetime import datetime, timezone
from pathlib import Path

from mae.config import ConfigError

LOCK_FILE = "run.lock"
_HELD = (errno.EACCES, errno.EAGAIN)  # what lockf raises while another process holds the lock
_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class OutputDirBusy(ConfigError):
    """Another run holds output_dir (exit 2). Only rank 0 prints it: the other ranks exit quietly."""

    def __init__(self, msg: str, quiet: bool = False):
        super().__init__(msg)
        self.quiet = quiet


class RunLock:
    """A held lock. `release()` empties the holder record and unlocks (closing the descriptor); with `remove`
    it deletes the lock file first, while still holding it (a waiter that opened it then finds it replaced and
    tries again: see `acquire`)."""

    def __init__(self, fd: int, path: Path | None = None):
        self.fd, self.path = fd, path

    def release(self, remove: bool = False) -> None:
        if self.fd >= 0:
            if remove and self.path is not None:
                self.path.unlink(missing_ok=True)
            os.ftruncate(self.fd, 0)
            os.close(self.fd)
            self.fd = -1


def holder_record() -> dict:
    """Who holds the lock: written into the lock file so that a refused run can name it."""
    rec = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "since": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
    }
    if os.environ.get("SLURM_JOB_ID"):
        rec["slurm_job"] = os.environ["SLURM_JOB_ID"]
    return rec


def describe(fd: int) -> str:
    """'host H, pid P, since T[, SLURM job J]' from the lock file, or what is known when it is empty."""
    try:
        rec = json.loads(os.pread(fd, 4096, 0) or b"{}")
        text = f"host {rec['host']}, pid {rec['pid']}, since {rec['since']}"
        return text + (f", SLURM job {rec['slurm_job']}" if rec.get("slurm_job") else "")
    except (OSError, ValueError, KeyError, TypeError):
        return "holder not recorded yet"


def acquire(out: Path, wait_s: float, notice=print, name: str = "output_dir",
            wait_key: str = "checkpoint.lock_wait_s") -> RunLock | None:  # fmt: skip
    """Lock `out` (created if missing), waiting up to `wait_s` seconds for a holder to end; raise
    OutputDirBusy naming the holder after that. None (with a warning) on a filesystem without locks.
    `name`: what the messages call the directory (a command's OUT_DIR); `wait_key`: the setting of the wait."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    deadline, waiting = time.monotonic() + wait_s, False
    while True:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if _same_file(fd, path):
                break
            os.close(fd)  # its holder removed it as it left: lock the file that is there now
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            continue
        except OSError as e:
            if e.errno not in _HELD:
                os.close(fd)
                if e.errno in _UNSUPPORTED:
                    notice(f"warning: {path}: the filesystem does not support locks ({e.strerror}); "
                           f"nothing stops a second run from using this {name}")  # fmt: skip
                    return None
                raise
        left = deadline - time.monotonic()
        if left <= 0:
            holder = describe(fd)
            os.close(fd)
            waited = f"; waited {wait_s:g} s ({wait_key})" if wait_s > 0 else ""
            raise OutputDirBusy(
                f"{name} {out} is in use by another run ({holder}){waited}: let it finish or stop it, or "
                f"choose another {name}"
            )
        if not waiting:
            notice(f"{name} {out} is in use by another run ({describe(fd)}); waiting up to {wait_s:g} s")
            waiting = True
        time.sleep(min(0.2, left))
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder_record()).encode() + b"\n", 0)
    return RunLock(fd, path)


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def claim_output_dir(out: Path, wait_s: float, accelerator) -> RunLock | None:
    """All ranks: rank 0 takes the lock (one holder per run, also across nodes on a shared filesystem);
    the others learn the verdict from it, so every rank of a refused launch exits 2 and none waits."""
    lock, msg = None, ""
    if accelerator.is_main_process:
        try:
            lock = acquire(out, wait_s)
        except OutputDirBusy as e:
            msg = str(e)
        except OSError as e:  # e.g. a read-only or missing parent: every rank stops with the same line
            msg = f"output_dir {out} cannot be created or locked: {e.strerror or e}"
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        msg = broadcast_object_list([msg], from_process=0)[0]
    if msg:
        raise OutputDirBusy(msg, quiet=not accelerator.is_main_process)
    return lock


def remove_if_unused(out: Path) -> None:
    """Remove a run directory that holds nothing but its (released) lock file."""
    try:
        if {p.name for p in out.iterdir()} <= {LOCK_FILE}:
            (out / LOCK_FILE).unlink(missing_ok=True)
            out.rmdir()
    except OSError:
        pass

"""The output folder of an onboarding: built in a temporary sibling folder, moved into place at the end.

Nothing half-written is ever visible at the destination: either the old folder (or nothing) is
there, or the complete new one. An existing destination is replaced only with ``force``.

:func:`claim_output` holds a lock file beside the destination for the whole onboarding, so a second
onboarding into the same folder is refused instead of mixing files with the first. While it holds the
lock it also clears what an onboarding killed earlier (SIGKILL, power loss) left beside the
destination: its staging folder, and the previous folder when the kill came in the middle of
:meth:`StagingFolder.publish`.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from onboardlm.errors import OnboardlmError

DEFAULT_ROOT = Path("onboarded")
_STAGING = "staging-"


class OutputExists(OnboardlmError):
    """The output folder exists and ``--force`` was not given."""


class OutputUnwritable(OnboardlmError):
    """The output folder cannot be created where it was asked for."""


class OutputBusy(OnboardlmError):
    """Another onboarding is writing the same output folder."""


def output_name(model_name: str) -> str:
    """A folder name for a model: ``Qwen/Qwen3-8B`` -> ``Qwen__Qwen3-8B``; paths keep their last part."""
    base = model_name.rstrip("/")
    if base.startswith((".", "/", "~")) or Path(base).suffix == ".gguf":
        base = Path(base).name.removesuffix(".gguf")
    return re.sub(r"[^A-Za-z0-9._-]+", "__", base).strip("_") or "model"


def check_destination(out_dir: Path, force: bool) -> None:
    """Refuse an output folder that cannot be (re)placed: a file, or an existing folder without ``force``."""
    _check_parents(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputExists(str(out_dir), "exists and is not a folder", "choose another --out")
    if out_dir.exists() and not force:
        raise OutputExists(str(out_dir), "output folder already exists", "pass --force to replace it")


def _check_parents(out_dir: Path) -> None:
    blocking = next((parent for parent in out_dir.parents if parent.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise OutputUnwritable(str(out_dir), f"{blocking} is a file, not a folder", "choose another --out")


class StagingFolder:
    """A temporary folder next to ``destination``; :meth:`publish` moves it into place."""

    def __init__(self, destination: Path) -> None:
        self.destination = destination
        with _unwritable_as_error(destination):
            destination.parent.mkdir(parents=True, exist_ok=True)
            self.path = Path(
                tempfile.mkdtemp(prefix=f".{destination.name}.{_STAGING}", dir=destination.parent)
            )

    def publish(self) -> Path:
        """Replace the destination with the staged folder (the old one is removed only afterwards)."""
        backup = None
        if self.destination.exists():
            backup = _backup_of(self.destination)
            shutil.rmtree(backup, ignore_errors=True)
            self.destination.rename(backup)
        self.path.rename(self.destination)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
        return self.destination

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


@contextmanager
def claim_output(destination: Path, force: bool) -> Iterator[StagingFolder]:
    """Lock ``destination`` for one onboarding and yield its staging folder.

    Raises :class:`OutputBusy` when another onboarding holds the lock, :class:`OutputExists` or
    :class:`OutputUnwritable` for a destination that cannot be (re)placed. The staging folder is
    discarded unless published, and the lock file removed, however the block ends.
    """
    _check_parents(destination)
    with _unwritable_as_error(destination):
        destination.parent.mkdir(parents=True, exist_ok=True)
    lock = _lock(destination)  # first: a busy folder is the news, even when it also exists
    try:
        _recover(destination)
        check_destination(destination, force)
        staging = StagingFolder(destination)
        try:
            yield staging
        finally:
            staging.discard()
    finally:
        _unlock(destination, lock)


def _backup_of(destination: Path) -> Path:
    return destination.with_name(f".{destination.name}.old")


def _lock_file(destination: Path) -> Path:
    return destination.with_name(f".{destination.name}.lock")


def _lock(destination: Path) -> int:
    """Take the destination's lock without waiting; the file holds the owner's pid."""
    path = _lock_file(destination)
    while True:
        with _unwritable_as_error(destination):
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            who = (
                f"another onboardlm onboard (pid {owner})" if owner.isdigit() else "another onboardlm onboard"
            )
            raise OutputBusy(
                str(destination),
                f"{who} is writing this output folder",
                "wait for it to finish or choose another --out",
            ) from None
        # The previous owner removes the file on release: if it did so after our open, lock again.
        with suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                os.ftruncate(fd, 0)
                os.write(fd, str(os.getpid()).encode())
                return fd
        os.close(fd)


def _unlock(destination: Path, fd: int) -> None:
    with suppress(FileNotFoundError):
        _lock_file(destination).unlink()  # while still locked, so no one else holds this file
    os.close(fd)


def _recover(destination: Path) -> None:
    """Undo what a killed onboarding left beside ``destination`` (call with its lock held)."""
    backup = _backup_of(destination)
    if backup.is_dir():
        if destination.exists():
            shutil.rmtree(backup, ignore_errors=True)
        else:  # killed between the two renames of publish: the previous folder is the backup
            backup.rename(destination)
    pattern = re.compile(rf"\.{re.escape(destination.name)}\.{_STAGING}[a-z0-9_]{{8}}")
    for path in destination.parent.iterdir():
        if pattern.fullmatch(path.name) and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


@contextmanager
def _unwritable_as_error(destination: Path) -> Iterator[None]:
    try:
        yield
    except OSError as err:
        where = f": {err.filename}" if err.filename else ""
        raise OutputUnwritable(
            str(destination),
            f"cannot write the output folder ({err.strerror}{where})",
            "choose a writable --out",
        ) from None

"""Disks that refuse writes, for real: a tmpfs mounted read-only or filled up (as root), or, without
root, a folder without write permission or a file-size limit (RLIMIT_FSIZE) on the child process."""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


def can_mount() -> bool:
    return os.geteuid() == 0 and shutil.which("mount") is not None


@contextlib.contextmanager
def tmpfs(path: Path, options: str) -> Iterator[Path]:
    """A real tmpfs mounted at `path` (root only), unmounted afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@contextlib.contextmanager
def read_only_folder(path: Path) -> Iterator[Path]:
    """A folder nobody may write in: a read-only tmpfs as root (root writes through chmod), a
    mode-555 folder otherwise."""
    if can_mount():
        with tmpfs(path, "ro,size=1m"):
            yield path
        return
    path.mkdir()
    path.chmod(0o555)
    try:
        yield path
    finally:
        path.chmod(0o755)


@dataclass
class SmallDisk:
    """`path`: a folder whose writes can be made to fail once `fill()` is called: a 4 MB tmpfs
    filled up but for `room` bytes (root), or, without root, a 64 KB file-size limit that
    `preexec_fn` sets on a child process. `free()` gives the space back."""

    path: Path
    mounted: bool
    filler: Path | None = None
    limited: bool = False

    def fill(self, room: int = 128 * 1024) -> None:
        if not self.mounted:
            self.limited = True
            return
        self.filler = self.path / "filler"
        with contextlib.suppress(OSError), open(self.filler, "wb") as handle:
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
        os.truncate(self.filler, max(0, self.filler.stat().st_size - room))

    def free(self) -> None:
        if self.filler is not None:
            self.filler.unlink()
        self.filler, self.limited = None, False

    @property
    def preexec_fn(self) -> Callable[[], None] | None:
        if not self.limited:
            return None
        return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    @property
    def error(self) -> str:
        """What the failed write says (a regular expression)."""
        return "no space left on the disk: a checkpoint needs about" if self.mounted else "File too large"


@contextlib.contextmanager
def small_disk(path: Path) -> Iterator[SmallDisk]:
    if can_mount():
        with tmpfs(path, "size=4m"):
            yield SmallDisk(path, mounted=True)
        return
    path.mkdir()
    yield SmallDisk(path, mounted=False)

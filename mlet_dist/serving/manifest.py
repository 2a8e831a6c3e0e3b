"""``manifest.json`` of a serving directory: what it holds, checksums, provenance.

The manifest is written last (after every other file is complete) and lists every file of the
directory with its size and sha256. :func:`verify_manifest` refuses a directory whose files do
not match it, naming the first file that differs.

Format ``mlet_dist.serving/2`` lists the serving predictors under ``serving.artifacts`` (one entry
per kind of :mod:`mlet_dist.serving.artifacts` written: the torch.export program, and optionally an
AOTInductor package and a TorchScript file), each with its size and sha256;
``serving.predictor`` names the default one. Format 1 (written before torch.export
became the default) had only ``serving.predictor``, a TorchScript file; it is still read.
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
from pathlib import Path
from typing import Any

from mlet_dist import __version__
from mlet_dist.errors import MletError
from mlet_dist.utils.files import finite_json, sha256_file

MANIFEST = "manifest.json"
FORMAT = "mlet_dist.serving/2"
READABLE_FORMATS = ("mlet_dist.serving/1", FORMAT)


class ServingError(MletError, RuntimeError):
    """A serving directory is missing, damaged or does not match its manifest; the message says which."""


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
        out["mlet_dist"] = __version__
    return out


def write_manifest(root: Path, content: dict[str, Any]) -> dict[str, Any]:
    """Adds the file list (checksums) and versions to ``content`` and writes ``root/manifest.json``.

    Each entry of ``content["serving"]["artifacts"]`` also gets the ``bytes`` and ``sha256`` of
    its ``path`` from the file list.
    """
    manifest = {"format": FORMAT, **content}
    manifest["versions"] = library_versions()
    manifest["files"] = file_entries(root)
    by_path = {f["path"]: f for f in manifest["files"]}
    for artifact in (manifest.get("serving") or {}).get("artifacts", {}).values():
        entry = by_path[artifact["path"]]
        artifact.update(bytes=entry["bytes"], sha256=entry["sha256"])
    (root / MANIFEST).write_text(json.dumps(finite_json(manifest), indent=1, allow_nan=False))
    return manifest


def read_manifest(root: str | Path) -> dict[str, Any]:
    """The manifest of a serving directory, its shape checked (:func:`check_manifest`).

    Raises:
        ServingError: no manifest, not JSON, an unknown format, a missing key or a value of the
            wrong type, or a path that leaves the directory (named, one line).
    """
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise ServingError(
            f"{root} is not a serving directory (no {MANIFEST}); pass the --out directory of "
            f"`mlet-dist collapse`"
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ServingError(f"{path} is not valid JSON ({e}); collapse the run again") from e
    format_ = manifest.get("format") if isinstance(manifest, dict) else None
    if format_ not in READABLE_FORMATS:
        raise ServingError(
            f"{path} has format {format_!r}, expected one of {READABLE_FORMATS}; "
            f"collapse the run again with this version"
        )
    check_manifest(manifest, root)
    return manifest


def _typed(value: Any, types: type | tuple[type, ...], where: str, path: Path) -> Any:
    """``value`` when it has one of ``types`` (a bool is no int); else a one-line ServingError."""
    if isinstance(value, types) and not (isinstance(value, bool) and bool not in _tuple(types)):
        return value
    names = "/".join(t.__name__ for t in _tuple(types)).replace("NoneType", "null")
    raise ServingError(
        f"{path}: {where} must be {names}, got {json.dumps(value)[:80]}; the manifest was edited "
        f"or damaged: collapse the run again"
    )


def _tuple(types: type | tuple[type, ...]) -> tuple[type, ...]:
    return types if isinstance(types, tuple) else (types,)


def inside(root: str | Path, rel: str, where: str) -> Path:
    """``root / rel`` when ``rel`` is a relative path that stays inside ``root`` (symbolic links
    resolved); else a one-line ServingError naming ``where``."""
    root = Path(root)
    target = root / rel
    escapes = (
        not rel
        or Path(rel).is_absolute()
        or ".." in Path(rel).parts
        or not target.resolve().is_relative_to(root.resolve())
    )
    if escapes:
        raise ServingError(
            f"{root / MANIFEST}: {where} {rel!r} is not inside the serving directory (absolute, "
            f"'..' or a link out of it); refusing to read it. Collapse the run again"
        )
    return target


def check_manifest(manifest: dict[str, Any], root: str | Path) -> None:
    """Checks the keys and types a reader of a serving directory uses, and that every path the
    manifest names (files, predictors, vocabularies, tables, model) stays inside ``root``.

    Raises:
        ServingError: the first key missing or of the wrong type, or the first path outside.
    """
    where = Path(root) / MANIFEST
    paths: list[tuple[str, str]] = []
    for i, entry in enumerate(_typed(manifest.get("files"), list, "'files'", where)):
        _typed(entry, dict, f"files[{i}]", where)
        paths.append((_typed(entry.get("path"), str, f"files[{i}].path", where), "file"))
        _typed(entry.get("bytes"), int, f"files[{i}].bytes", where)
        _typed(entry.get("sha256"), str, f"files[{i}].sha256", where)
    serving = _typed(manifest.get("serving", {}), dict, "'serving'", where)
    if _typed(serving.get("predictor"), (str, type(None)), "serving.predictor", where):
        paths.append((serving["predictor"], "serving.predictor"))
    if serving.get("tables") is not None:
        paths.append((_typed(serving["tables"], str, "serving.tables", where), "serving.tables"))
    artifacts_ = _typed(
        serving.get("artifacts", {}), (dict, type(None)), "serving.artifacts", where
    )
    for kind, artifact in (artifacts_ or {}).items():
        _typed(artifact, dict, f"serving.artifacts.{kind}", where)
        paths.append(
            (
                _typed(artifact.get("path"), str, f"serving.artifacts.{kind}.path", where),
                f"the {kind} predictor",
            )
        )
    vocabularies = _typed(
        serving.get("vocabularies", {}), (dict, type(None)), "serving.vocabularies", where
    )
    for table, rel in (vocabularies or {}).items():
        paths.append((_typed(rel, str, f"serving.vocabularies.{table}", where), "vocabulary"))
    for key in ("dtype",):
        if key in serving:
            _typed(serving[key], str, f"serving.{key}", where)
    if "feature_order" in serving:
        for f in _typed(serving["feature_order"], list, "serving.feature_order", where):
            _typed(f, str, "serving.feature_order[]", where)
    for i, table in enumerate(_typed(manifest.get("tables", []), list, "'tables'", where)):
        _typed(table, dict, f"tables[{i}]", where)
        _typed(table.get("rows"), int, f"tables[{i}].rows", where)
        for f in _typed(table.get("features"), list, f"tables[{i}].features", where):
            _typed(f, str, f"tables[{i}].features[]", where)
        for rel in _typed(table.get("parquet", []), list, f"tables[{i}].parquet", where):
            paths.append((_typed(rel, str, f"tables[{i}].parquet[]", where), "table file"))
    model = _typed(manifest.get("model", {}), dict, "'model'", where)
    for key in ("checkpoint", "config"):
        if model.get(key) is not None:
            paths.append((_typed(model[key], str, f"model.{key}", where), f"model.{key}"))
    source = _typed(manifest.get("source", {}), dict, "'source'", where)
    config = _typed(source.get("config", {}), dict, "source.config", where)
    _typed(config.get("data", {}), dict, "source.config.data", where)
    for rel, what in paths:
        inside(root, rel, what)


def artifacts(manifest: dict[str, Any]) -> dict[str, str]:
    """The serving predictors a manifest lists: kind ('export', 'aoti', ...) -> path.

    Format 1 manifests list one TorchScript predictor (``serving.predictor``).
    """
    serving = manifest.get("serving") or {}
    if manifest.get("format") == "mlet_dist.serving/1":
        return {"torchscript": serving["predictor"]} if serving.get("predictor") else {}
    return {kind: a["path"] for kind, a in (serving.get("artifacts") or {}).items()}


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
    listed = {entry["path"]: entry for entry in manifest["files"]}
    unlisted = sorted((only or set()) - set(listed))
    if unlisted:
        raise ServingError(
            f"{root / unlisted[0]} is not listed in {root / MANIFEST}; collapse again"
        )
    for kind, artifact in ((manifest.get("serving") or {}).get("artifacts") or {}).items():
        entry = listed.get(artifact["path"], {})
        if (artifact.get("bytes"), artifact.get("sha256")) != (
            entry.get("bytes"),
            entry.get("sha256"),
        ):
            raise ServingError(
                f"{root / MANIFEST}: the {kind} predictor's size/sha256 differ from its entry in "
                f"the file list (the manifest was edited); collapse again"
            )
    for entry in manifest["files"]:
        if only is not None and entry["path"] not in only:
            continue
        path = inside(root, entry["path"], "file")
        if not path.is_file():
            raise ServingError(f"{path} is listed in {root / MANIFEST} but missing; collapse again")
        if path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
            raise ServingError(
                f"{path} does not match its checksum in {root / MANIFEST} (modified or damaged); "
                f"refusing to use it. Collapse the run again or restore the file."
            )
    return manifest

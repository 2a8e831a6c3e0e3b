"""Carry a Python package stack to an offline GPU machine in parts, and install it there.

The GPU machine (docs: ../shared/docs/GPU.md) has torch but no TorchRec/fbgemm-gpu and no network,
and each call to it carries at most 64 MiB. ``benchmarks/gpu_prepare.sh`` (here) installs the
wheels into a ``pip install --target`` tree, packs that tree as one ``.tar.xz`` (the 465 MB
fbgemm-gpu wheel is deflate; xz of its unpacked 2.4 GB is ~176 MB) and calls :func:`split` to cut
it into parts with a ``SHA256SUMS`` file. ``benchmarks/gpu_check.sh`` (there) calls
:func:`install`: find every listed part, check its sha256, join the parts, check the whole
archive's sha256, and extract it into a site directory for ``PYTHONPATH``.

Why our own code: the joining and checking is ``cat`` + ``sha256sum -c`` + ``tar xJf``, but the
parts arrive over several calls in different folders, a missing or corrupt part must be named (not
surface as an xz error), and it must be testable here; Python's ``lzma``/``tarfile`` need no tool
on the GPU machine.

    python -m benchmarks.gpu_bundle split --archive A.tar.xz --parts-dir DIR [--part-mib 55]
    python -m benchmarks.gpu_bundle install --parts-dir DIR [--parts-dir DIR2 ...] --site SITE
"""

from __future__ import annotations

import argparse
import hashlib
import lzma
import os
import shutil
import sys
import tarfile
from pathlib import Path

SUMS = "SHA256SUMS"
STAMP = ".mlet_bundle_sha256"
PART_MARK = ".part-"


class BundleError(RuntimeError):
    """A part is missing or corrupt, or the archive cannot be used; the message names the fix."""


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def read_sums(path: str | Path) -> dict[str, str]:
    """``name -> sha256`` from a file in ``sha256sum`` format (``HEX  NAME`` per line)."""
    out = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2 or len(parts[0]) != 64:
            raise BundleError(f"{path}:{n}: expected 'SHA256  NAME', got {line!r}")
        out[parts[1].lstrip("*")] = parts[0]
    return out


def split(archive: str | Path, parts_dir: str | Path, part_bytes: int) -> list[Path]:
    """Cuts ``archive`` into ``<name>.part-NN`` files of at most ``part_bytes`` in ``parts_dir``
    and writes ``parts_dir/SHA256SUMS`` (the archive's and every part's sha256).

    The archive itself is only read. Parts of an earlier split of the same name in ``parts_dir``
    are replaced (they are this function's own output).
    """
    archive, parts_dir = Path(archive), Path(parts_dir)
    if part_bytes <= 0:
        raise ValueError(f"part size must be positive, got {part_bytes}")
    parts_dir.mkdir(parents=True, exist_ok=True)
    for old in parts_dir.glob(archive.name + PART_MARK + "*"):
        old.unlink()
    parts = []
    with open(archive, "rb") as src:
        while True:
            block = src.read(part_bytes)
            if not block:
                break
            part = parts_dir / f"{archive.name}{PART_MARK}{len(parts):02d}"
            part.write_bytes(block)
            parts.append(part)
    lines = [f"{sha256_file(archive)}  {archive.name}"]
    lines += [f"{sha256_file(p)}  {p.name}" for p in parts]
    tmp = parts_dir / (SUMS + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(parts_dir / SUMS)
    return parts


def _archive_name(sums: dict[str, str]) -> str:
    names = [n for n in sums if PART_MARK not in n]
    if len(names) != 1:
        raise BundleError(f"{SUMS} must list exactly one archive besides its parts, got {names}")
    return names[0]


def find_sums(parts_dirs: list[Path]) -> Path:
    for d in parts_dirs:
        if (d / SUMS).is_file():
            return d / SUMS
    raise BundleError(
        f"no {SUMS} in {', '.join(map(str, parts_dirs))}: carry .gpuwhl/parts/{SUMS} "
        f"(written by benchmarks/gpu_prepare.sh) with the parts"
    )


def join(parts_dirs: list[Path], out_dir: Path) -> Path:
    """Checks and joins the parts listed in ``SHA256SUMS`` into ``out_dir/<archive>``.

    Each part is taken from the first of ``parts_dirs`` that holds it. An archive already
    joined there with the right sha256 is reused.

    Raises:
        BundleError: a part is missing (all missing ones are named) or has another sha256, or
            the joined archive's sha256 differs.
    """
    sums_path = find_sums(parts_dirs)
    sums = read_sums(sums_path)
    name = _archive_name(sums)
    out = out_dir / name
    if out.is_file() and sha256_file(out) == sums[name]:
        return out
    part_names = sorted(n for n in sums if n.startswith(name + PART_MARK))
    if not part_names:
        raise BundleError(f"{sums_path} lists no parts of {name}")
    found, missing = {}, []
    for n in part_names:
        where = next((d / n for d in parts_dirs if (d / n).is_file()), None)
        if where is None:
            missing.append(n)
        else:
            found[n] = where
    if missing:
        raise BundleError(
            f"parts missing: {', '.join(missing)} (looked in {', '.join(map(str, parts_dirs))}); "
            f"copy each carried part into one of these folders"
        )
    for n, path in found.items():
        got = sha256_file(path)
        if got != sums[n]:
            raise BundleError(
                f"part {path} has sha256 {got}, {sums_path} says {sums[n]}: it is damaged or from "
                f"another gpu_prepare.sh run; carry it again"
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / (name + ".tmp")
    with open(tmp, "wb") as dst:
        for n in part_names:
            with open(found[n], "rb") as src:
                shutil.copyfileobj(src, dst, 1 << 22)
    got = sha256_file(tmp)
    if got != sums[name]:
        tmp.unlink()
        raise BundleError(f"the joined {name} has sha256 {got}, {sums_path} says {sums[name]}")
    tmp.replace(out)
    return out


def unpack(archive: Path, site: Path, sha256: str) -> Path:
    """Extracts the ``.tar.xz`` (whose members lie under ``site/``) into ``site``.

    Idempotent: a ``site`` stamped with the same archive sha256 is kept as it is. The tree is
    extracted next to ``site`` first and moved into place whole, so an interrupted unpack never
    leaves a half-filled ``site`` behind.
    """
    stamp = site / STAMP
    if stamp.is_file() and stamp.read_text().strip() == sha256:
        return site
    staging = site.with_name(site.name + ".unpacking")
    if staging.exists():
        shutil.rmtree(staging)  # our own leftover of an interrupted unpack
    staging.mkdir(parents=True)
    extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    with lzma.open(archive) as xz, tarfile.open(fileobj=xz, mode="r|") as tar:
        tar.extractall(staging, **extra)
    tree = staging / "site"
    if not tree.is_dir():
        raise BundleError(
            f"{archive} has no top-level 'site/' folder; repack it with gpu_prepare.sh"
        )
    (tree / STAMP).write_text(sha256 + "\n")
    if site.exists():
        shutil.rmtree(site)  # an older bundle's tree (its stamp differs)
    tree.replace(site)
    shutil.rmtree(staging)
    return site


def install(parts_dirs: list[Path], site: Path, work: Path) -> Path:
    """:func:`join` into ``work``, then :func:`unpack` into ``site``; returns ``site``."""
    sums = read_sums(find_sums(parts_dirs))
    name = _archive_name(sums)
    stamp = site / STAMP
    if stamp.is_file() and stamp.read_text().strip() == sums[name]:
        return site  # already installed from this very archive
    archive = join(parts_dirs, work)
    return unpack(archive, site, sums[name])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_bundle")
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("split", help="cut an archive into parts and write SHA256SUMS")
    s.add_argument("--archive", required=True)
    s.add_argument("--parts-dir", required=True)
    s.add_argument("--part-mib", type=float, default=55.0)
    i = sub.add_parser("install", help="check, join and unpack the parts into a site dir")
    i.add_argument("--parts-dir", action="append", required=True, help="may be repeated")
    i.add_argument("--site", required=True)
    i.add_argument("--work", default=None, help="where the joined archive goes (default: site/..)")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "split":
            parts = split(args.archive, args.parts_dir, int(args.part_mib * 2**20))
            for p in parts:
                print(f"{p}  {p.stat().st_size / 2**20:.1f} MiB")
        else:
            site = Path(args.site)
            work = Path(args.work) if args.work else site.parent / "mlet_bundle_work"
            install([Path(d) for d in args.parts_dir], site, work)
            print(f"installed into {site}")
    except (BundleError, OSError) as e:
        print(f"gpu_bundle: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    os.umask(0o022)
    raise SystemExit(main())

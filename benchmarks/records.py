"""What every suite of ``python -m benchmarks.run`` shares: its command-line options, the common
fields of its record and the record's files (``<suite>[-quick]_<hardware>_<date>[_<tag>]`` .json
and .md, see :func:`benchmarks.common.result_stem`).

A suite module that also runs on its own (``python -m benchmarks.serving_bench [options]``) uses
these instead of calling back into the runner, so that no two benchmark modules import each
other (the import contracts of pyproject.toml).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import shlex
import warnings
from pathlib import Path
from typing import Any

from benchmarks.common import (
    DEFAULT_OUT,
    DEFAULT_TRAIN_CONFIG,
    hardware_tag,
    library_versions,
    result_stem,
)


def progress(line: str) -> None:
    print(line, flush=True)


def suite_arguments(
    argv: list[str], prog: str, suites: list[str] | None = None, description: str | None = None
) -> tuple[argparse.Namespace, list[str]]:
    """The runner's options (``--suite`` when ``suites`` are given, ``--quick``, ``--out``,
    ``--config``, ``--tag``) and the ``--section.key=value`` overrides after them."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog="Other --section.key=value arguments override the train config.",
    )
    if suites:
        parser.add_argument("--suite", choices=[*suites, "all"], default="all")
    parser.add_argument("--quick", action="store_true", help="small sizes, a minute or so")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="results directory")
    parser.add_argument("--config", default=str(DEFAULT_TRAIN_CONFIG), help="train config")
    parser.add_argument(
        "--tag", default="", help="appended to the result file names (e.g. 'malloc-tuned')"
    )
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if not o.startswith("--") or "=" not in o]
    if bad:
        parser.error(f"unknown arguments {bad}; config overrides look like --section.key=value")
    return args, overrides


def prepare_run(args: argparse.Namespace) -> Path:
    """Quiet library logs and notices; the results directory (made)."""
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("torchrec").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def base_record(suite: str, args: argparse.Namespace, argv: list[str], machine: dict) -> dict:
    """The fields every suite's record has; ``argv``: the runner's arguments."""
    today = datetime.date.today()
    return {
        "suite": suite,
        "hardware_tag": hardware_tag(machine),
        "date": today.isoformat(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick,
        "tag": args.tag,
        "command": "python -m benchmarks.run " + shlex.join(argv),
        "versions": library_versions(),
        "machine": machine,
    }


def record_stem(record: dict[str, Any], out: Path) -> Path:
    """``out/<suite>[-quick]_<hardware>_<date>[_<tag>]``: the record's files without suffix."""
    when = datetime.date.fromisoformat(record["date"])
    stem = result_stem(record["suite"], record["hardware_tag"], record["quick"], when)
    return out / (stem + (f"_{record['tag']}" if record.get("tag") else ""))


def write_record(record: dict[str, Any], out: Path, markdown: str | None) -> Path:
    """Writes the record's .json (and .md); returns their stem."""
    stem = record_stem(record, out)
    record.setdefault("files", {})
    record["files"]["json"] = stem.name + ".json"
    if markdown is not None:
        stem.with_name(stem.name + ".md").write_text(markdown)
        record["files"]["markdown"] = stem.name + ".md"
    stem.with_name(stem.name + ".json").write_text(json.dumps(record, indent=1) + "\n")
    return stem

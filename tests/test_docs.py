"""Docs that lie are bugs: every command in README.md and docs/*.md is real and run, every link
resolves, and every pointer from the code into the docs names a page or section that exists.

- Commands are the logical lines (``\\`` continuations joined, ``for … done`` kept whole, comments
  dropped) of the ```bash / ```sh / ```shell blocks, and the ``$ `` lines of ```console blocks.
- A mlet-dist command (``mlet-dist …``, ``python -m mlet_dist …``, ``torchrun … -m mlet_dist …``,
  ``python -m torch.distributed.run … -m mlet_dist …``) is parsed by the real parser of
  ``mlet_dist/cli.py`` (torchrun's part by torchrun's own parser); its ``--config`` file must exist
  (or be a ```toml block of the same page whose first line is ``# <name>``), and the config loads
  with its ``--section.key=value`` overrides through ``mlet_dist.config.load_config``.
- Every command is either run here (:data:`RUN_HERE`: cheap ones, redirected into tmp) or named in
  :data:`RUN_BY` with the tests (or CI) that run it; the named test functions must exist.
- Relative links and ``#anchors`` of the Markdown files resolve (GitHub's heading anchors).
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHELL_BLOCKS = {"bash", "sh", "shell", "console"}

# Commands run by other tests or by CI: a command that starts with the key (whitespace
# normalized) is run by every entry of the value ("CI: X": .ci/run runs X, a part of the command).
RUN_BY: dict[str, tuple[str, ...]] = {
    # README quick start: CI runs setup.sh; the job itself (shrunk, into tmp) runs below
    "bash launch/setup.sh && .venv/bin/torchrun --nproc-per-node 2 -m mlet_dist run --config "
    "configs/synthetic_small.toml": (
        "CI: bash launch/setup.sh",
        "tests/test_docs.py::test_quick_start_job_runs",
    ),
    "bash launch/setup.sh && .venv/bin/python -m pytest tests": (
        "CI: bash launch/setup.sh && .venv/bin/python -m pytest tests",
    ),
    ".venv/bin/lint-imports": (
        "CI: .venv/bin/lint-imports",
        "tests/test_layout.py::test_import_contracts_hold",
    ),
    # serving
    ".venv/bin/torchrun --nproc-per-node 2 -m mlet_dist collapse": (
        "tests/test_collapse_dist.py::test_collapse_run_on_two_ranks_writes_a_loadable_checkpoint",
    ),
    ".venv/bin/mlet-dist collapse --run": (
        "tests/test_torchrun.py::test_torchrun_two_ranks_train_then_collapse",
    ),
    ".venv/bin/mlet-dist predict --serving": (
        "tests/test_serving.py::test_predict_command_writes_one_probability_per_line",
    ),
    ".venv/bin/mlet-dist serve --serving": (
        "tests/test_serve.py::test_served_answers_equal_predict_at_batch_1",
        "tests/test_serve.py::test_sigterm_answers_the_requests_in_flight",
    ),
    # a request missing columns: 400 naming the first
    "curl -s localhost:8080/predict -d": (
        "tests/test_serve.py::test_concurrent_burst_of_valid_and_malformed_requests",
    ),
    # data
    ".venv/bin/mlet-dist preprocess --config configs/criteo_1tb.toml": (
        "tests/test_preprocess.py::test_synthetic_mlperf_days_end_to_end",
        "tests/test_preprocess.py::test_cli_preprocess_with_process_pool",
    ),
    ".venv/bin/mlet-dist run --config events.toml": (
        "tests/test_synthetic_schema.py::test_shipped_config_end_to_end",
        "tests/test_schema.py::test_docs_worked_example_is_a_valid_schema",
    ),
    ".venv/bin/mlet-dist preprocess --config events.toml": (
        "tests/test_schema_dist.py::test_preprocess_stream_two_ranks_collapse_predict",
    ),
    ".venv/bin/mlet-dist train --config events.toml": (
        "tests/test_schema_dist.py::test_preprocess_stream_two_ranks_collapse_predict",
    ),
    ".venv/bin/mlet-dist collapse --run runs/default": (
        "tests/test_schema_dist.py::test_preprocess_stream_two_ranks_collapse_predict",
    ),
    ".venv/bin/mlet-dist predict --serving served --data new_events": (
        "tests/test_schema_dist.py::test_collapse_is_exact_and_predict_reads_the_training_inputs",
    ),
    ".venv/bin/mlet-dist run --config configs/schema_synthetic.toml": (
        "tests/test_synthetic_schema.py::test_shipped_config_end_to_end",
    ),
    ".venv/bin/mlet-dist run --config configs/movielens_features.toml": (
        "tests/test_schema_movielens.py::test_preset_trains_collapses_and_predicts",
    ),
    # operations
    ".venv/bin/mlet-dist train --config configs/synthetic_small.toml --train.tensorboard=true": (
        "tests/test_pipeline.py::test_tensorboard_events_hold_the_listed_scalars",
    ),
    ".venv/bin/torchx run -s local_cwd launch/components.py:train": (
        "tests/test_launch.py::test_torchx_local_cwd_one_node_two_processes",
    ),
    ".venv/bin/torchrun --standalone --nproc-per-node 2 -m mlet_dist train": (
        "tests/test_torchrun.py::test_torchrun_two_ranks_train_then_collapse",
    ),
    'MLET_FAULT_INJECT="rank=1,step=7"': (
        "tests/test_launch.py::test_injected_fault_restarts_from_checkpoint_and_matches",
    ),
    "ip ": ("tests/test_launch.py::test_two_nodes_over_a_veth_link_equal_one_node",),
    "for i in 0 1;": ("tests/test_launch.py::test_two_nodes_over_a_veth_link_equal_one_node",),
    # results
    ".venv/bin/mlet-dist sweep": (
        "tests/test_sweep.py::test_frontier_and_recommendation_recomputed",
    ),
    ".venv/bin/torchx run -s slurm launch/components.py:sweep": (
        "tests/test_sweep.py::test_shards_partition_the_runs_and_the_torchx_component_passes_them",
        "tests/test_docs.py::test_slurm_commands_render",
    ),
    ".venv/bin/python -m benchmarks.quality --quick --data synthetic": (
        "tests/test_quality_study.py::test_quick_study_output_is_consistent",
    ),
    ".venv/bin/python -m benchmarks.quality --sweep --quick": (
        "tests/test_quality_study.py::test_quick_sweep_writes_one_row_per_point",
    ),
    ".venv/bin/python -m benchmarks.fp16_w1_quality --quick": (
        "tests/test_fp16_w1.py::test_quick_quality_study_pairs_runs_by_seed",
    ),
    ".venv/bin/python -m benchmarks.collapse_bench --quick": (
        "tests/test_collapse_bench.py::test_quick_benchmark_writes_json_and_markdown",
    ),
    ".venv/bin/python -m benchmarks.run --suite all --quick": (
        "tests/test_benchmarks.py::test_train_suite_files_and_keys",
        "tests/test_benchmarks.py::test_serving_suite_files_and_keys",
    ),
    ".venv/bin/python -m benchmarks.schema_preprocess_bench --quick": (
        "tests/test_preprocess_bench.py::test_schema_preprocess_bench_quick_output_format",
    ),
}

# Commands this file runs itself (cheap; outputs redirected into tmp): key -> test.
RUN_HERE: dict[str, str] = {
    ".venv/bin/mlet-dist plan": "test_plan_and_generate_commands_run",
    ".venv/bin/mlet-dist generate": "test_plan_and_generate_commands_run",
    ".venv/bin/python -m mlet_dist.config_doc --write docs/config.md": "test_config_doc_write_is_a_no_op",
    ".venv/bin/torchx run -s slurm -cfg": "test_slurm_commands_render",
}


# -- reading the Markdown ------------------------------------------------------------------------


def doc_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


@dataclass
class Block:
    lang: str
    lines: list[str]
    line: int  # of the opening fence, 1-based


def blocks(text: str) -> list[Block]:
    """The fenced code blocks of a Markdown text."""
    out, current = [], None
    for i, line in enumerate(text.splitlines(), 1):
        fence = re.match(r"^\s*```(\S*)", line)
        if current is None and fence:
            current = Block(fence.group(1).lower(), [], i)
        elif current is not None and re.match(r"^\s*```\s*$", line):
            out.append(current)
            current = None
        elif current is not None:
            current.lines.append(line)
    return out


def strip_comment(line: str) -> str:
    """``line`` without a shell comment (a ``#`` at the start of a word, outside quotes)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def commands(block: Block) -> list[str]:
    """The logical command lines of a shell block (whitespace normalized)."""
    lines = block.lines
    if block.lang == "console":
        lines, keep = [], False
        for line in block.lines:  # "$ " lines and their continuations; the rest is output
            if line.startswith("$ "):
                lines.append(line[2:])
                keep = line.rstrip().endswith("\\")
            elif keep:
                lines.append(line)
                keep = line.rstrip().endswith("\\")
    out, pending, depth = [], "", 0
    for raw in lines:
        line = strip_comment(raw)
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        pending += line
        words = re.findall(r"[\w]+", pending)
        depth = words.count("do") - words.count("done") + words.count("if") - words.count("fi")
        if depth > 0:  # inside for/while/if: the compound command is one command
            pending += "\n"
            continue
        command = " ".join(pending.split())
        if command:
            out.append(command)
        pending = ""
    return out


def toml_blocks(text: str) -> dict[str, str]:
    """```toml blocks whose first line is ``# <name>``: name -> text (configs defined in a page)."""
    out = {}
    for b in blocks(text):
        if b.lang == "toml" and b.lines and re.match(r"^#\s*\S+\.toml\s*$", b.lines[0]):
            out[b.lines[0].lstrip("#").strip()] = "\n".join(b.lines[1:]) + "\n"
    return out


def documented_commands() -> list[tuple[Path, int, str]]:
    out = []
    for path in doc_files():
        for b in blocks(path.read_text()):
            if b.lang in SHELL_BLOCKS:
                out += [(path, b.line, c) for c in commands(b)]
    return out


# -- checking a command --------------------------------------------------------------------------


def _simple_commands(command: str) -> list[list[str]]:
    """The simple commands of a command line (split at ``&&``, ``||``, ``;``, ``|``, ``&``,
    newlines and ``do``/``then``), as shell words; shell arithmetic and variables are replaced by a
    placeholder so that the words parse."""
    command = re.sub(r"\$\(\([^)]*\)\)", "0", command)
    command = re.sub(r"\$\{?(\w+)\}?", r"\1", command)
    out = []
    for part in re.split(r"&&|\|\||[;|&\n]", command):
        words = shlex.split(part)
        while words and words[0] in ("for", "do", "done", "then", "fi", "while", "if"):
            words = words[1:] if words[0] != "for" else []
        if words:
            out.append(words)
    return out


def mlet_invocation(words: list[str]) -> tuple[list[str] | None, list[str]] | None:
    """(torchrun's arguments or None, mlet-dist's arguments) of a simple command, or None when it
    does not run mlet_dist."""
    for i, w in enumerate(words):
        name = os.path.basename(w)
        if name == "mlet-dist":
            return None, words[i + 1 :]
        if name.startswith("python") and words[i + 1 : i + 3] == ["-m", "mlet_dist"]:
            return None, words[i + 3 :]
        launcher = name == "torchrun" or (
            name.startswith("python") and words[i + 1 : i + 3] == ["-m", "torch.distributed.run"]
        )
        if launcher:
            rest = words[i + 1 :] if name == "torchrun" else words[i + 3 :]
            if "mlet_dist" not in rest:
                return None
            j = rest.index("mlet_dist")
            if j == 0 or rest[j - 1] != "-m":
                return None
            return rest[: j - 1], rest[j + 1 :]
    return None


def _parser():
    from mlet_dist import cli

    build = getattr(cli, "build_parser", None) or cli._parser  # the parser `mlet-dist` uses
    return build()


def check_mlet_command(
    command: str, defined: dict[str, str], tmp: Path
) -> tuple[list[str], list[tuple[object, list[str]]]]:
    """Problems of one command line, and the (parsed args, overrides) of its mlet-dist parts."""
    from mlet_dist.config import load_config

    problems, parsed = [], []
    for words in _simple_commands(command):
        found = mlet_invocation(words)
        if found is None:
            continue
        torchrun_args, args = found
        if torchrun_args is not None:
            from torch.distributed.run import get_args_parser

            try:
                with contextlib.redirect_stderr(io.StringIO()) as err:
                    t = get_args_parser().parse_args([*torchrun_args, "-m", "mlet_dist", *args])
            except SystemExit:
                problems.append(f"torchrun refuses its arguments {torchrun_args}: {err.getvalue()}")
                continue
            assert t.module and t.training_script == "mlet_dist"
        if {"--help", "-h", "--version"} & set(args):
            continue  # argparse prints and exits: nothing more to check
        try:
            with contextlib.redirect_stderr(io.StringIO()) as err:
                ns, rest = _parser().parse_known_args(args)
        except SystemExit:
            problems.append(f"`mlet-dist {' '.join(args)}`: {err.getvalue().strip()}")
            continue
        bad = [a for a in rest if not re.fullmatch(r"--\w+\.[\w.]+=.*", a)]
        if bad:
            problems.append(f"`mlet-dist {' '.join(args)}`: unrecognized arguments {bad}")
            continue
        config = getattr(ns, "config", None)
        path = None
        if config is not None:
            if config in defined:
                path = tmp / config
                path.write_text(defined[config])
            elif (REPO / config).is_file():
                path = REPO / config
            else:
                problems.append(f"`mlet-dist {' '.join(args)}`: no config file {config}")
                continue
        if ns.command in ("collapse", "predict") and rest:
            problems.append(f"`mlet-dist {ns.command}` takes no overrides, got {rest}")
            continue
        try:
            load_config(path, rest)
        except Exception as e:  # a ConfigError names the key
            problems.append(f"`mlet-dist {' '.join(args)}`: {type(e).__name__}: {e}")
            continue
        sweep_file = getattr(ns, "sweep", None)
        if ns.command == "sweep" and sweep_file:
            if not (REPO / sweep_file).is_file():
                problems.append(f"`mlet-dist sweep`: no sweep file {sweep_file}")
                continue
            from mlet_dist.sweep import load_sweep

            load_sweep(REPO / sweep_file)
        parsed.append((ns, rest))
    return problems, parsed


def _key(command: str, table: dict) -> str | None:
    """The longest key of ``table`` that ``command`` starts with."""
    keys = [k for k in table if command.startswith(k)]
    return max(keys, key=len) if keys else None


def _test_exists(ref: str) -> bool:
    file, name = ref.split("::")
    tree = ast.parse((REPO / file).read_text())
    return any(isinstance(n, ast.FunctionDef) and n.name == name for n in ast.walk(tree))


def coverage_problems(cmds: list[tuple[Path, int, str]]) -> list[str]:
    problems = []
    ci = (REPO / ".ci" / "run").read_text()
    for path, line, command in cmds:
        where = f"{path.relative_to(REPO)}:{line}"
        here, by = _key(command, RUN_HERE), _key(command, RUN_BY)
        if here is None and by is None:
            problems.append(f"{where}: no test runs `{command}` (add it to RUN_BY or RUN_HERE)")
        for ref in RUN_BY.get(by, ()) if by else ():
            if ref.startswith("CI: "):
                part = ref.removeprefix("CI: ")
                if part not in command or part not in ci:
                    problems.append(f"{where}: .ci/run does not run `{part}` of `{command}`")
            elif not _test_exists(ref):
                problems.append(f"{where}: {ref} (said to run `{command}`) does not exist")
    return problems


# -- links ---------------------------------------------------------------------------------------


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    text = re.sub(r"[`*]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading.strip())
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
    out: set[str] = set()
    for h in re.findall(r"^#{1,6}\s+(.+?)\s*#*$", text, flags=re.M):
        s, n = slug(h), 1
        while s in out:
            s, n = f"{slug(h)}-{n}", n + 1
        out.add(s)
    return out


def headings(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
    return {h.strip().strip("`") for h in re.findall(r"^#{1,6}\s+(.+?)\s*$", text, flags=re.M)}


def link_problems(path: Path, text: str) -> list[str]:
    problems = []
    prose = re.sub(r"^\s*```.*?^\s*```", "", text, flags=re.S | re.M)
    prose = re.sub(r"`[^`\n]*`", "", prose)
    for target in re.findall(r"\]\(([^)\s]+)\)", prose):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            problems.append(f"{path.name}: link to {target}: no such file")
        elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
            problems.append(f"{path.name}: link to {target}: no such section")
    return problems


# -- references from the code -----------------------------------------------------------------

REF_DIRS = ("mlet_dist", "launch", "benchmarks", "tests", "configs", ".ci")
# README "X" (also split over two comment lines: README / # "X"), or an unreadable README "…
README_REF = re.compile(r"README\s+(?:#\s*)?([\"'])([^\"'\n]*)\1|README\s+(?:#\s*)?[\"']")


def reference_problems(name: str, text: str) -> list[str]:
    """README "X" must name a heading of README.md; docs/x.md(#a) an existing page (section)."""
    problems = []
    readme = {h.lower() for h in headings(REPO / "README.md")}
    for m in README_REF.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        if m.group(2) is None or m.group(2).lower() not in readme:
            problems.append(f"{name}:{line}: {m.group(0)!r} names no section of README.md")
    for m in re.finditer(r"(?<![\w/.])docs/([\w-]+\.md)(#[\w-]+)?", text):
        line = text.count("\n", 0, m.start()) + 1
        page = REPO / "docs" / m.group(1)
        if not page.is_file():
            problems.append(f"{name}:{line}: {m.group(0)} does not exist")
        elif m.group(2) and m.group(2)[1:] not in anchors(page):
            problems.append(f"{name}:{line}: {m.group(0)}: no such section")
    return problems


# -- the tests -----------------------------------------------------------------------------------


def test_docs_hold_commands_and_the_readme_stays_short():
    assert len((REPO / "README.md").read_text().splitlines()) <= 300
    cmds = documented_commands()
    assert len(cmds) >= 20, cmds
    readme = [c for p, _, c in cmds if p.name == "README.md"]
    # the quick start, verbatim (CI and users copy it)
    assert (
        "bash launch/setup.sh && .venv/bin/torchrun --nproc-per-node 2 -m mlet_dist run "
        "--config configs/synthetic_small.toml" in readme
    )
    assert "bash launch/setup.sh && .venv/bin/python -m pytest tests" in readme


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_mlet_commands_parse_and_their_configs_load(path, tmp_path):
    text = path.read_text()
    defined = toml_blocks(text)
    problems = []
    for b in blocks(text):
        if b.lang in SHELL_BLOCKS:
            for command in commands(b):
                problems += check_mlet_command(command, defined, tmp_path)[0]
    assert not problems, "\n".join(problems)


def test_every_command_is_run_by_a_test_or_ci():
    cmds = documented_commands()
    assert not coverage_problems(cmds), "\n".join(coverage_problems(cmds))
    used = {_key(c, RUN_BY) for _, _, c in cmds} | {_key(c, RUN_HERE) for _, _, c in cmds}
    stale = (set(RUN_BY) | set(RUN_HERE)) - used
    assert not stale, f"entries that match no documented command: {stale}"
    assert all(_test_exists(f"tests/test_docs.py::{name}") for name in RUN_HERE.values())


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_links_and_anchors_resolve(path):
    problems = link_problems(path, path.read_text())
    assert not problems, "\n".join(problems)


def test_a_lying_doc_is_caught(tmp_path):
    """A made-up key, a missing config, a misspelt command or option, an untested command and a
    dead link or anchor are each reported."""
    page = tmp_path / "bad.md"
    page.write_text(
        "# Bad\n\n[dead](nowhere.md) [gone](#no-such-section) [ok](#bad)\n\n"
        "```bash\n"
        "mlet-dist train --config configs/synthetic_small.toml --model.no_such_key=1\n"
        "mlet-dist train --config configs/no_such.toml\n"
        "mlet-dist trian --config configs/synthetic_small.toml\n"
        "mlet-dist collapse --run r --out o --no-such-flag\n"
        ".venv/bin/torchrun --no-such-torchrun-flag 2 -m mlet_dist train --config configs/synthetic_small.toml\n"
        "mlet-dist train --config configs/synthetic_small.toml --model.inner_dim=66\n"
        "```\n"
    )  # fmt: skip
    (b,) = blocks(page.read_text())
    problems = [check_mlet_command(c, {}, tmp_path)[0] for c in commands(b)]
    assert [len(p) for p in problems] == [1, 1, 1, 1, 1, 1], problems
    assert "no_such_key" in problems[0][0]
    assert "no config file configs/no_such.toml" in problems[1][0]
    assert "trian" in problems[2][0] and "--no-such-flag" in problems[3][0]
    assert "torchrun refuses" in problems[4][0] and "multiple of 4" in problems[5][0]
    assert coverage_problems([(REPO / "README.md", 1, "mlet-dist frobnicate")])
    links = link_problems(page, page.read_text())
    assert len(links) == 2 and "nowhere.md" in links[0] and "no-such-section" in links[1]
    assert reference_problems("x.py", 'see README "No such section" and docs/nope.md') == [
        "x.py:1: 'README \"No such section\"' names no section of README.md",
        "x.py:1: docs/nope.md does not exist",
    ]


def test_plan_and_generate_commands_run(tmp_path, capsys):
    """The documented `plan` and `generate` commands, run (outputs into tmp, generate shrunk)."""
    from mlet_dist import cli

    ran = set()
    for _, _, command in documented_commands():
        key = _key(command, RUN_HERE)
        if key not in (".venv/bin/mlet-dist plan", ".venv/bin/mlet-dist generate"):
            continue
        (args,) = [found[1] for w in _simple_commands(command) if (found := mlet_invocation(w))]
        if args[0] == "plan":
            args += ["--out", str(tmp_path / "plan.json")]
        else:
            args += [f"--data.dir={tmp_path / 'data'}", "--synthetic.rows_per_day=200"]
        assert cli.main(args) == 0, command
        ran.add(args[0])
    assert ran == {"plan", "generate"}
    assert json.loads((tmp_path / "plan.json").read_text())["totals"]["fits"]
    assert sorted(p.name for p in (tmp_path / "data").glob("day_*")) == ["day_0.gz", "day_1.gz"]


def test_config_doc_write_is_a_no_op(tmp_path):
    """`python -m mlet_dist.config_doc --write docs/config.md` on a copy leaves it unchanged."""
    copy = tmp_path / "config.md"
    copy.write_text((REPO / "docs" / "config.md").read_text())
    subprocess.run(
        [sys.executable, "-m", "mlet_dist.config_doc", "--write", str(copy)],
        cwd=REPO, check=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert copy.read_text() == (REPO / "docs" / "config.md").read_text()


def test_slurm_commands_render():
    """The documented Slurm submissions, as `torchx run --dryrun`: the sbatch script TorchX would
    submit runs the documented mlet-dist command."""
    rendered = 0
    for _, _, command in documented_commands():
        if " -s slurm " not in command:
            continue
        words = shlex.split(command)
        assert os.path.basename(words[0]) == "torchx" and words[1] == "run", command
        done = subprocess.run(
            [sys.executable, "-m", "torchx.cli.main", "run", "--dryrun", *words[2:]],
            cwd=REPO, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        config = words[words.index("--config") + 1]
        assert f"-m mlet_dist {'sweep' if ':sweep' in command else 'train'} --config {config}" in (
            done.stdout
        ), done.stdout[-3000:]
        for override in words[words.index("--") + 1 :] if "--" in words else []:
            assert override in done.stdout
        rendered += 1
    assert rendered == 2


@pytest.mark.slow
def test_quick_start_job_runs(tmp_path):
    """The README's quick start job (`torchrun --nproc-per-node 2 -m mlet_dist run --config
    configs/synthetic_small.toml`), shrunk and into tmp: generate, train, evaluate, collapse and
    the checks that the collapsed model predicts what the trained one does (exit code 0)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR")}
    done = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "mlet_dist", "run", "--config", "configs/synthetic_small.toml",
            f"--data.dir={tmp_path / 'data'}", f"--train.run_dir={tmp_path / 'run'}",
            "--synthetic.rows_per_day=3000", "--train.progress=false",
        ],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["collapse_check"]["passed"]
    assert (tmp_path / "run" / "served" / "manifest.json").is_file()


def test_code_points_to_docs_that_exist():
    """Every `README "X"` in the code names a README section, every `docs/x.md(#a)` a page (and
    section) that exists.

    NOTE (issue 22, branch r-docs): this fails until the lead applies /work/wt/docs-refs.sed, which
    rewrites the old README section names (README "Your own data", 'Trust', …) to the docs pages.
    """
    problems = []
    for d in REF_DIRS:
        for path in sorted((REPO / d).rglob("*")):
            skip = "results" in path.parts or path == Path(__file__).resolve()
            if path.is_file() and path.suffix in (".py", ".sh", ".toml", "") and not skip:
                name = str(path.relative_to(REPO))
                problems += reference_problems(name, path.read_text(errors="replace"))
    assert not problems, "\n".join(problems)

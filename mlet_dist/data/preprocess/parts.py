"""Planning a preprocessing run: its settings, the split of the input lines into parts, and where
each part's files go; reading a part's lines (shared by the counting and the writing pass)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from mlet_dist.config import ConfigError, DataConfig
from mlet_dist.data.arrays import CAT_FEATURE_COUNT, CriteoArrays
from mlet_dist.data.criteo import ON_BAD_ROW, BadRow, iter_line_blocks, parse_lines

SPLITS = ("train", "eval", "test")
"""Split directories of a preprocessed dataset."""
MLPERF_DAYS = 24

STATE = "_state"
QUARANTINE = "quarantine"


@dataclass(frozen=True)
class PreprocessSettings:
    """What a preprocessing run produces; a re-run into the same directory must use the same.

    Attributes:
        num_embeddings_per_feature: hash size of each of the 26 categorical features.
        frequency_threshold: ids seen fewer times than this in the training lines become
            :data:`RARE_ID` (0 = keep all).
        on_bad_row: 'error' (stop at the first malformed line) or 'skip' (quarantine it).
        row_group_rows: rows per Parquet row group.
        eval_fraction: fraction of lines in the eval split (not for the 24 MLPerf days).
        test_fraction: fraction of lines in the test split (not for the 24 MLPerf days).
        max_rows: read at most this many lines per input file (0 = all).
        compression: Parquet compression codec.
    """

    num_embeddings_per_feature: tuple[int, ...]
    frequency_threshold: int = 0
    on_bad_row: str = "error"
    row_group_rows: int = 131072
    eval_fraction: float = 0.0
    test_fraction: float = 0.0
    max_rows: int = 0
    compression: str = "snappy"

    def __post_init__(self) -> None:
        sizes = tuple(int(s) for s in self.num_embeddings_per_feature)
        object.__setattr__(self, "num_embeddings_per_feature", sizes)
        if len(sizes) != CAT_FEATURE_COUNT or min(sizes) <= 0:
            raise ConfigError(
                f"num_embeddings_per_feature needs {CAT_FEATURE_COUNT} positive hash sizes, got "
                f"{len(sizes)} values (data.num_embeddings_per_feature)"
            )
        if self.on_bad_row not in ON_BAD_ROW:
            raise ConfigError(f"on_bad_row must be one of {ON_BAD_ROW}, got {self.on_bad_row!r}")
        if not 0 <= self.frequency_threshold <= 65535:
            raise ConfigError(
                f"frequency_threshold must be in [0, 65535], got {self.frequency_threshold}"
            )
        if self.row_group_rows <= 0 or self.max_rows < 0:
            raise ConfigError("row_group_rows must be positive and max_rows >= 0")
        for name in ("eval_fraction", "test_fraction"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.eval_fraction + self.test_fraction >= 1.0:
            raise ConfigError("eval_fraction + test_fraction must be < 1 (no training lines left)")

    @classmethod
    def from_config(cls, data_cfg: DataConfig) -> PreprocessSettings:
        """The settings of the [data] section of a config."""
        return cls(
            num_embeddings_per_feature=tuple(data_cfg.num_embeddings_per_feature),
            frequency_threshold=data_cfg.frequency_threshold,
            on_bad_row=data_cfg.on_bad_row,
            row_group_rows=data_cfg.row_group_rows,
            eval_fraction=data_cfg.eval_fraction,
            test_fraction=data_cfg.test_fraction,
            max_rows=data_cfg.max_rows,
        )


@dataclass(frozen=True)
class Part:
    """One output file: lines ``[start, stop)`` (0-based) of one input file, in one split.

    ``stop = 0`` means to the end of the file.
    """

    split: str
    source: str
    name: str
    start: int = 0
    stop: int = 0

    @property
    def key(self) -> str:
        return f"{self.split}/{self.name}"


def _stem(path: str | Path) -> str:
    """The output name of an input: its file name without .gz, then without .tsv/.txt."""
    name = Path(path).name
    for suffix in (".gz", ".tsv", ".txt"):
        if name.endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
    return name


def is_mlperf_days(files: Sequence[str | Path]) -> bool:
    """Whether ``files`` are exactly the 24 Criteo 1TB days ``day_0`` .. ``day_23`` (.gz or not)."""
    names = sorted(_stem(f) for f in files)
    return len(files) == MLPERF_DAYS and names == sorted(f"day_{d}" for d in range(MLPERF_DAYS))


def count_lines(path: str | Path, stop: int = 0) -> int:
    """Lines of a Criteo file (plain or gzip), as the reader numbers them; at most ``stop``.

    Raises:
        CriteoFormatError: missing or truncated file.
    """
    return sum(data.count(b"\n") for _, data in iter_line_blocks(path, stop=stop))


def _fraction_parts(
    files: Sequence[str],
    eval_fraction: float,
    test_fraction: float,
    max_rows: int,
    line_counts: Callable[[list[str]], list[int]],
) -> list[Part]:
    if eval_fraction == 0.0 and test_fraction == 0.0:
        return [Part("train", f, _stem(f), 0, max_rows) for f in files]
    counts = line_counts(list(files))
    n = sum(counts)
    n_eval, n_test = round(n * eval_fraction), round(n * test_fraction)
    n_train = n - n_eval - n_test
    bounds = {
        "train": (0, n_train),
        "eval": (n_train, n_train + n_eval),
        "test": (n_train + n_eval, n),
    }
    parts = []
    offset = 0
    for f, count in zip(files, counts):
        for split, (lo, hi) in bounds.items():
            a, b = max(lo, offset), min(hi, offset + count)
            if a < b:
                parts.append(Part(split, f, _stem(f), a - offset, b - offset))
        offset += count
    return parts


def plan_parts(
    files: Sequence[str | Path],
    *,
    eval_fraction: float,
    test_fraction: float,
    eval_files: Sequence[str | Path] = (),
    max_rows: int = 0,
    line_counts: Callable[[list[str]], list[int]] | None = None,
) -> tuple[str, list[Part]]:
    """Assigns line ranges of the input files to the train/eval/test splits.

    Args:
        files: input files, in chronological order.
        eval_fraction: fraction of lines for eval (fraction mode).
        test_fraction: fraction of lines for test (fraction and eval-files modes).
        eval_files: files that form the eval split as a whole (optional).
        max_rows: lines read per file at most (0 = all).
        line_counts: returns the line count of each given file (capped at ``max_rows``); only
            called for the files whose count the split needs. Default: :func:`count_lines`.

    Returns:
        ``(mode, parts)`` with mode 'mlperf_days', 'fraction' or 'eval_files'.

    Raises:
        ConfigError: no files, or two inputs with the same name (outputs are named after them).

    Example::

        mode, parts = plan_parts([f"day_{d}.gz" for d in range(24)], eval_fraction=0.0,
                                 test_fraction=0.0)
        # mode == 'mlperf_days'; parts[-2:] are day_23's eval and test halves
    """
    files = [str(f) for f in files]
    eval_files = [str(f) for f in eval_files]
    if not files:
        raise ConfigError("no input files to preprocess (give --input FILE... or data.train_files)")
    names = [_stem(f) for f in files + eval_files]
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        raise ConfigError(
            f"several inputs are named {dups} (outputs are named after the input file): rename "
            f"them or preprocess them into different directories"
        )

    def counted(paths: list[str]) -> list[int]:
        if line_counts is not None:
            return line_counts(paths)
        return [count_lines(p, max_rows) for p in paths]

    if eval_files:
        parts = _fraction_parts(files, 0.0, test_fraction, max_rows, counted)
        return "eval_files", parts + [Part("eval", f, _stem(f), 0, max_rows) for f in eval_files]
    if is_mlperf_days(files):
        by_day = sorted(files, key=lambda f: int(_stem(f)[4:]))
        parts = [Part("train", f, _stem(f), 0, max_rows) for f in by_day[:-1]]
        (n,) = counted([by_day[-1]])
        half = (n + 1) // 2  # eval gets the extra line of an odd count, as in TorchRec
        if half:
            parts.append(Part("eval", by_day[-1], "day_23", 0, half))
        if n - half:
            parts.append(Part("test", by_day[-1], "day_23", half, n))
        return "mlperf_days", parts
    return "fraction", _fraction_parts(files, eval_fraction, test_fraction, max_rows, counted)


def read_part(
    part: Part, settings: PreprocessSettings
) -> Iterator[tuple[int, CriteoArrays, list[BadRow]]]:
    """Parses a part's lines chunk by chunk: ``(input bytes, valid rows, bad lines)`` per chunk.

    Raises:
        CriteoFormatError: a missing or truncated input, or a malformed line under 'error'.
    """
    for first_line, data in iter_line_blocks(part.source, start=part.start, stop=part.stop):
        arrays, bad = parse_lines(
            part.source,
            data,
            first_line,
            settings.num_embeddings_per_feature,
            on_bad_row=settings.on_bad_row,
        )
        yield len(data), arrays, bad


# ------------------------------------------------------------------------------------ files


def output_path(out: Path, part: Part) -> Path:
    return out / part.split / f"{part.name}.parquet"


def part_state_path(out: Path, part: Part) -> Path:
    return out / STATE / "parts" / part.split / f"{part.name}.json"


def part_seen_path(out: Path, part: Part) -> Path:
    return out / STATE / "parts" / part.split / f"{part.name}.seen.npz"


def quarantine_path(out: Path, part: Part) -> Path:
    return out / QUARANTINE / part.split / f"{part.name}.jsonl"


def counts_path(out: Path, part: Part) -> Path:
    return out / STATE / "counts" / f"{part.name}.npz"


def frequent_path(out: Path) -> Path:
    return out / STATE / "frequent.npz"


def is_done(out: Path, part: Part) -> bool:
    return output_path(out, part).is_file() and part_state_path(out, part).is_file()

"""What a collapse is asked to write (:class:`CollapseOptions`), checked in one place."""

from __future__ import annotations

from dataclasses import dataclass

from mlet_dist.config import ConfigError
from mlet_dist.export.sinks import DEFAULT_ROW_GROUP_ROWS
from mlet_dist.modules.collapse import DEFAULT_CHUNK_ROWS
from mlet_dist.modules.quantize import check_dtype
from mlet_dist.serving.artifacts import (
    ARTIFACTS,
    default_artifacts,
    optional_artifacts,
    skipped_by_environment,
)
from mlet_dist.serving.manifest import ServingError


class CollapseError(ServingError):
    """A run cannot be collapsed as asked (e.g. it has no factorized tables); the message says why."""


@dataclass(frozen=True)
class CollapseOptions:
    """The choices of one collapse (``mlet-dist collapse`` flags).

    Attributes:
        quantize: serving table format of the predictor and ``serving/tables``: 'fp32' (none),
            'fp16' or 'int8' (TorchRec's row-wise int8, fp16 scale and bias).
        chunk_rows: rows per matmul/reduction (bounds the temporary memory).
        allow_plain: a run without factorized tables (``model.inner_dim = 0``) is refused unless
            this is set; then its tables are exported as they are.
        predictor: build the serving predictors (rank 0 assembles every serving table for them):
            the default one (``serving/predictor.pt2``, torch.export) and those of ``artifacts``.
        row_group_rows: rows per Parquet row group (the owners buffer this many).
        artifacts: the optional serving artifacts to write too, by kind
            (:func:`mlet_dist.serving.artifacts.optional_artifacts`): 'aoti' (the AOTInductor
            package ``serving/predictor_aoti.pt2``; if it cannot be compiled the collapse is
            refused, nothing is published), 'torchscript' (``serving/predictor.pt``, deprecated in
            torch 2.13; for torchrec.inference's C++ server). 'aoti' is also written without being
            asked where it can be built (:func:`mlet_dist.serving.artifacts.default_artifacts`);
            asked for, it is required.
        skip: kinds written by default not to write (``--no-aoti``); default (None): those the
            environment variable ``MLET_DIST_SKIP_ARTIFACTS`` names (the test suite's opt-out)
            that ``artifacts`` does not ask for.

    Example::

        collapse_run("runs/mlet", "served", CollapseOptions(quantize="int8", artifacts=("aoti",)))
    """

    quantize: str = "fp32"
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    allow_plain: bool = False
    predictor: bool = True
    row_group_rows: int = DEFAULT_ROW_GROUP_ROWS
    artifacts: tuple[str, ...] = ()
    skip: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.skip is None:  # the environment's opt-out, except for the kinds asked for
            kinds = self.artifacts if not isinstance(self.artifacts, str) else (self.artifacts,)
            skip = tuple(k for k in skipped_by_environment() if k not in kinds)
            object.__setattr__(self, "skip", skip)
        for name in ("artifacts", "skip"):  # any iterable of kinds
            kinds = getattr(self, name)
            object.__setattr__(self, name, (kinds,) if isinstance(kinds, str) else tuple(kinds))

    def check(self) -> None:
        """Refuses options that cannot be honoured, before any work.

        Raises:
            ValueError: an unknown serving dtype.
            ConfigError: an unknown artifact kind, a non-positive chunk or row group size.
            CollapseError: optional artifacts without a predictor.
            AOTIError: 'aoti' is asked for and AOTInductor has no C++ compiler here.
        """
        check_dtype(self.quantize)
        if self.chunk_rows <= 0:
            raise ConfigError(f"chunk_rows must be positive, got {self.chunk_rows}")
        if self.row_group_rows <= 0:
            raise ConfigError(f"row_group_rows must be positive, got {self.row_group_rows}")
        optional = optional_artifacts()
        unknown = [k for k in self.artifacts if k not in {a.kind for a in optional}]
        if unknown:
            raise ConfigError(
                f"unknown optional serving artifact {unknown[0]!r}; the kinds are "
                f"{[a.kind for a in optional]}"
            )
        defaults = {a.kind for a in default_artifacts()}
        unknown = [k for k in self.skip if k not in defaults]
        if unknown:
            raise ConfigError(
                f"{unknown[0]!r} is not written by default, so it cannot be skipped; the kinds "
                f"written by default are {sorted(defaults)}"
            )
        both = [k for k in self.artifacts if k in self.skip]
        if both:
            a = ARTIFACTS[both[0]]
            raise ConfigError(f"{a.flag} and {a.skip_flag} contradict each other: drop one")
        if not self.predictor and self.artifacts:
            raise CollapseError(
                "--no-predictor (predictor=False) writes no predictor, so there is nothing to "
                f"compile or script: drop it, or drop {' / '.join(a.flag for a in optional)}"
            )
        for kind in self.artifacts:
            if ARTIFACTS[kind].check is not None:
                ARTIFACTS[kind].check()

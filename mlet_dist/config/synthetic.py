"""``[synthetic]``: the built-in synthetic data (a hidden low-rank teacher)."""

from __future__ import annotations

from dataclasses import dataclass, field

from mlet_dist.config.data import DEFAULT_SYNTHETIC_CARDINALITIES
from mlet_dist.config.error import ConfigError, check_number


@dataclass
class SyntheticConfig:
    """Synthetic data drawn from a hidden low-rank 'teacher': Criteo-format day files, or Parquet files in a declared schema's columns (docs/own-data.md)."""

    days: int = 2
    """Number of files written: day files day_0 … day_{days-1}, or with a declared schema part-00000.parquet …"""
    rows_per_day: int = 20000
    """Rows in each file."""
    cardinalities: list[int] = field(default_factory=lambda: list(DEFAULT_SYNTHETIC_CARDINALITIES))
    """Distinct ids per categorical feature (26 values; Criteo format only: a declared schema's features draw from their tables' rows)."""
    zipf_exponent: float = 1.05
    """Exponent of the Zipf distribution of ids: larger means more skew (more rare ids)."""
    teacher_rank: int = 8
    """Rank of the hidden teacher embeddings that generate the labels."""
    teacher_scale: float = 2.0
    """Scale of the teacher logit; larger gives a more learnable (higher-AUC) task."""
    teacher_spectrum_decay: float = 0.0
    """Power-law decay of the teacher's spectrum: component r of every teacher vector has variance proportional to (r + 1) ** -decay (renormalized to the same total). 0 = flat (every direction equally strong); > 0 makes a high-rank teacher whose leading directions matter most, so the quality keeps rising with the served d."""
    dense_missing_rate: float = 0.1
    """Fraction of integer features left empty (missing)."""
    sparse_missing_rate: float = 0.02
    """Fraction of categorical features left empty (missing; in a declared schema's files: null, or for a list half null and half empty)."""
    seed: int = 1234
    """Seed of the teacher and of the sampling."""
    gzip: bool = True
    """Write day_N.gz (True) or plain day_N (False); Criteo format only."""

    def check(self) -> None:
        """Checks of this section alone."""
        if self.days <= 0 or self.rows_per_day <= 0:
            raise ConfigError(
                f"synthetic.days and synthetic.rows_per_day must be positive, got "
                f"{self.days} and {self.rows_per_day}"
            )
        for key in ("dense_missing_rate", "sparse_missing_rate"):
            check_number(f"synthetic.{key}", getattr(self, key), 0, why="a fraction in [0, 1)")
            if getattr(self, key) >= 1:
                raise ConfigError(f"synthetic.{key} must be < 1, got {getattr(self, key)}")
        check_number("synthetic.zipf_exponent", self.zipf_exponent, 0, above=True)
        check_number("synthetic.teacher_rank", self.teacher_rank, 1)
        check_number("synthetic.teacher_scale", self.teacher_scale, 0)
        check_number("synthetic.teacher_spectrum_decay", self.teacher_spectrum_decay, 0)
        check_number("synthetic.seed", self.seed, 0)

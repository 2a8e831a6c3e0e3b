"""The sweep file (:class:`SweepSpec`, :class:`Recipe`) and the runs it expands to (:class:`RunSpec`):
stage 1 (tune) and stage 2 (frontier) of ``mlet-dist sweep`` (see :mod:`mlet_dist.sweep`)."""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tomllib

from mlet_dist.config import Config, ConfigError, apply_key, config_from_dict, validate

RESULT_FILE = "result.json"
RUN_SPEC_FILE = "sweep_run.json"
STAGES = ("tune", "frontier", "report")


# -- the sweep file ----------------------------------------------------------------------------


@dataclass
class Recipe:
    """One way of training a side: fixed config overrides plus a grid of values."""

    name: str
    """Short name used in run directories and reports (letters, digits, '-', '_')."""
    set: dict[str, Any] = field(default_factory=dict)
    """Fixed overrides, ``{"optim.embedding_optimizer" = "sgd", ...}`` (``section.key`` keys)."""
    grid: dict[str, list[Any]] = field(default_factory=dict)
    """Values tried in the tune stage (Cartesian product), e.g. ``{"optim.embedding_lr" = [...]}``."""
    inner_dims: list[int] = field(default_factory=list)
    """MLET recipes only: train this recipe at these k only (each one of the sweep's
    ``inner_dims``); empty: at every k."""


@dataclass
class SweepSpec:
    """A sweep file: the grid of ``mlet-dist sweep``."""

    dims: list[int] = field(default_factory=lambda: [4, 8, 16, 32])
    """Served dimensions d of both sides."""
    inner_dims: list[int] = field(default_factory=lambda: [64])
    """Inner dimensions k of MLET(k, d) (only d < k are trained)."""
    seeds: int = 3
    """Seeds per frontier variant (train.seed = config seed + 0, 1, ...)."""
    tune_dim: int = 8
    """d at which the recipes are tuned (eval split, one seed), unless ``tune_dims`` is given."""
    tune_dims: list[int] = field(default_factory=list)
    """Tune at each of these d (a learning rate tuned at one d need not suit another, e.g. an
    EBC(64) tuned at d = 8); the frontier at d uses the winner tuned at the nearest of them
    (in log2 d). Empty: ``[tune_dim]``."""
    frontier_k: str = "all"
    """'all': the frontier trains MLET(k, d) for every k of ``inner_dims``; 'best': at each d only
    the k whose tuned eval AUC (at the tune d nearest d) is best."""
    tune_seeds: int = 1
    """Seeds per tune point (the eval AUC is averaged over them)."""
    epochs: int = 1
    """1 = one pass over the training data; > 1 = up to this many epochs, each run's epoch chosen
    by its eval AUC (stops after the first epoch whose eval AUC is lower than the best)."""
    max_seeds: int = 0
    """More seeds where the seeds disagree: a frontier variant whose eval AUC spread (std over its
    ``seeds`` seeds) is above ``seed_spread`` is trained with ``max_seeds`` seeds. 0: off."""
    seed_spread: float = 0.005
    """The eval AUC std above which a variant gets ``max_seeds`` seeds."""
    epsilon: float = 0.001
    """The recommendation: the smallest served d whose mean eval AUC is within epsilon of the best."""
    baseline: list[Recipe] = field(default_factory=list)
    """Recipes of the single-layer baseline EBC(d)."""
    mlet: list[Recipe] = field(default_factory=list)
    """Recipes of MLET(k, d)."""

    def check(self, origin: str) -> None:
        if not self.dims or any(d <= 0 for d in self.dims):
            raise ConfigError(f"{origin}: dims must be a non-empty list of positive integers")
        if any(d % 4 for d in self.dims):
            raise ConfigError(
                f"{origin}: dims {self.dims}: every d must be a multiple of 4 (fbgemm's embedding "
                f"kernels, which train and serve the tables, need widths divisible by 4)"
            )
        if any(k <= 0 for k in self.inner_dims):
            raise ConfigError(f"{origin}: inner_dims must be positive integers")
        if self.seeds < 1 or self.tune_seeds < 1 or self.epochs < 1:
            raise ConfigError(f"{origin}: seeds, tune_seeds and epochs must be at least 1")
        if any(d <= 0 or d % 4 for d in self.tune_dims):
            raise ConfigError(
                f"{origin}: tune_dims {self.tune_dims} must be positive multiples of 4 (as dims)"
            )
        if self.frontier_k not in ("all", "best"):
            raise ConfigError(f"{origin}: frontier_k = {self.frontier_k!r}: use 'all' or 'best'")
        if self.max_seeds and self.max_seeds <= self.seeds:
            raise ConfigError(
                f"{origin}: max_seeds = {self.max_seeds} must be above seeds = {self.seeds} "
                f"(or 0: no extra seeds)"
            )
        if not self.seed_spread >= 0:
            raise ConfigError(f"{origin}: seed_spread must be >= 0 (an AUC std)")
        if not self.epsilon >= 0:
            raise ConfigError(f"{origin}: epsilon must be >= 0 (an AUC margin), got {self.epsilon}")
        if not self.baseline:
            raise ConfigError(f"{origin}: give at least one [[baseline]] recipe")
        if self.inner_dims and not self.mlet:
            raise ConfigError(f"{origin}: give at least one [[mlet]] recipe (or inner_dims = [])")
        names = [r.name for r in self.baseline] + [r.name for r in self.mlet]
        for r in [*self.baseline, *self.mlet]:
            if not r.name or not all(c.isalnum() or c in "-_" for c in r.name):
                raise ConfigError(f"{origin}: recipe name {r.name!r} must be letters/digits/-/_")
        for r in self.baseline:
            if r.inner_dims:
                raise ConfigError(
                    f"{origin}: [[baseline]] {r.name}: inner_dims is for MLET recipes"
                )
        for r in self.mlet:
            if not set(r.inner_dims) <= set(self.inner_dims):
                raise ConfigError(
                    f"{origin}: [[mlet]] {r.name}: inner_dims {r.inner_dims} must be among the "
                    f"sweep's inner_dims {self.inner_dims}"
                )
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"{origin}: recipe names must be unique, repeated: {dup}")


def load_sweep(path: str | Path, overrides: dict[str, Any] | None = None) -> SweepSpec:
    """Reads a sweep file; ``overrides`` replace top-level keys (``{"seeds": 1}``)."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"sweep file {path} does not exist (see configs/sweep/)") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"sweep file {path} is not valid TOML: {e}") from None
    raw.update(overrides or {})
    spec = SweepSpec()
    hints = typing.get_type_hints(SweepSpec)
    for key, value in raw.items():
        if key not in hints:
            raise ConfigError(f"{path}: unknown key {key!r}; valid keys: {', '.join(hints)}")
        if key in ("baseline", "mlet"):
            value = [_recipe(path, key, i, t) for i, t in enumerate(_list(path, key, value))]
        elif hints[key] is int and not _is_int(value):
            raise ConfigError(f"{path}: {key} = {value!r} must be an integer")
        elif hints[key] is float and not (
            isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
        ):
            raise ConfigError(f"{path}: {key} = {value!r} must be a number")
        elif hints[key] is str and not isinstance(value, str):
            raise ConfigError(f"{path}: {key} = {value!r} must be a string")
        elif key in ("dims", "inner_dims", "tune_dims") and not all(
            map(_is_int, _list(path, key, value))
        ):
            raise ConfigError(f"{path}: {key} = {value!r} must be a list of integers")
        setattr(spec, key, value)
    spec.check(str(path))
    return spec


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _list(path: Path, key: str, value: Any) -> list[Any]:
    if not isinstance(value, list):
        what = f"[[{key}]] tables" if key in ("baseline", "mlet") else "a list"
        raise ConfigError(f"{path}: {key} must be {what}, got {value!r}")
    return value


def _recipe(path: Path, key: str, i: int, table: Any) -> Recipe:
    """One ``[[baseline]]``/``[[mlet]]`` table as a Recipe, its keys and types checked."""
    where = f"{path}: [[{key}]] #{i + 1}"
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table (name, set, grid), got {table!r}")
    unknown = set(table) - set(typing.get_type_hints(Recipe))
    if unknown or "name" not in table:
        raise ConfigError(
            f"{where}: needs 'name'; unknown keys {sorted(unknown)} (valid: name, set, grid, inner_dims)"
        )
    if not isinstance(table["name"], str):
        raise ConfigError(f"{where}: name = {table['name']!r} must be a string")
    if not isinstance(table.get("set", {}), dict):
        raise ConfigError(f"{where}: set must be a table of section.key = value")
    grid = table.get("grid", {})
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise ConfigError(f"{where}: grid must be a table of section.key = [non-empty list]")
    dims = table.get("inner_dims", [])
    if not isinstance(dims, list) or not all(map(_is_int, dims)):
        raise ConfigError(f"{where}: inner_dims must be a list of integers, got {dims!r}")
    return Recipe(**table)


# -- runs --------------------------------------------------------------------------------------


@dataclass
class RunSpec:
    """One training run of the sweep."""

    stage: str
    side: str  # "baseline" | "mlet"
    k: int  # 0 for the baseline
    d: int
    recipe: str
    point: dict[str, Any]  # the grid values of this run
    seed: int
    config: dict[str, Any]  # Config.to_dict() of the run (run_dir included)
    epochs: int

    @property
    def variant(self) -> str:
        return f"MLET({self.k},{self.d})" if self.k else f"EBC({self.d})"

    @property
    def key(self) -> str:
        """A stable id of what the run computes (not where it runs)."""
        return config_key(self.config, self.epochs)

    @property
    def run_dir(self) -> Path:
        return Path(self.config["train"]["run_dir"])


def config_key(config: dict[str, Any], epochs: int) -> str:
    """Hash of a run's config as this version of the code reads it (``config_from_dict``, so a
    key added to the config later, with its default, does not make finished runs look changed)
    and of its epochs; the run directory and the progress bar are left out."""
    cfg = config_from_dict(copy.deepcopy(config), origin="sweep run config").to_dict()
    cfg["train"].pop("run_dir", None)
    cfg["train"].pop("progress", None)
    text = json.dumps({"config": cfg, "epochs": epochs}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _set(cfg: Config, dotted: str, value: Any, origin: str) -> None:
    # the same checks as --section.key=value overrides
    if "." not in dotted:
        raise ConfigError(f"{origin}: override key {dotted!r} must look like section.key")
    section, key = dotted.split(".", 1)
    apply_key(cfg, section, key, value, origin)


def variant_config(
    base: Config, k: int, d: int, recipe: Recipe, point: dict[str, Any], seed: int
) -> Config:
    """The config of one run: the recipe's overrides and grid point, then k, d and the seed.

    The bottom MLP's last size must equal d (DLRM interacts it with the embeddings): it is set to
    d; the other sizes are the user's.
    """
    cfg = copy.deepcopy(base)
    origin = f"sweep recipe {recipe.name}"
    for dotted, value in {**recipe.set, **point}.items():
        _set(cfg, dotted, value, origin)
    cfg.model.inner_dim = k
    cfg.model.inner_dim_per_table = {}  # (model.inner_dim_min_rows stays as the recipe sets it)
    cfg.model.embedding_dim = d
    if cfg.model.dense_arch_layer_sizes:
        cfg.model.dense_arch_layer_sizes = [*cfg.model.dense_arch_layer_sizes[:-1], d]
    cfg.train.seed = base.train.seed + seed
    cfg.train.progress = False
    try:  # refused here, before any run starts, rather than in the run
        validate(cfg)
    except ConfigError as e:
        raise ConfigError(f"{origin} (k = {k}, d = {d}, {_point_name(point)}): {e}") from None
    return cfg


def _points(recipe: Recipe) -> list[dict[str, Any]]:
    keys = sorted(recipe.grid)
    return [dict(zip(keys, vals)) for vals in itertools.product(*(recipe.grid[k] for k in keys))]


def _point_name(point: dict[str, Any]) -> str:
    return "_".join(f"{k.split('.')[-1]}-{v}" for k, v in sorted(point.items())) or "default"


def _sides(spec: SweepSpec, d: int) -> list[tuple[str, int, list[Recipe]]]:
    sides = [("baseline", 0, spec.baseline)]
    # k == d adds no width to train with: MLET(k, d) is swept for k > d only.
    for k in spec.inner_dims:
        recipes = [r for r in spec.mlet if not r.inner_dims or k in r.inner_dims]
        if k > d and recipes:
            sides.append(("mlet", k, recipes))
    return sides


def tune_dims(spec: SweepSpec) -> list[int]:
    """The d values the recipes are tuned at."""
    return sorted(spec.tune_dims) if spec.tune_dims else [spec.tune_dim]


def check_variants(base: Config, spec: SweepSpec) -> None:
    """Builds the config of every variant the sweep may train (each d, side, recipe and grid
    point), so that a value the config refuses stops the sweep before any run starts.

    Raises:
        ConfigError: naming the recipe, k, d, the grid point and the key.
    """
    for d in sorted({*spec.dims, *tune_dims(spec)}):
        for _, k, recipes in _sides(spec, d):
            for recipe in recipes:
                for point in _points(recipe):
                    variant_config(base, k, d, recipe, point, 0)


def tune_runs(base: Config, spec: SweepSpec, work: Path) -> list[RunSpec]:
    """Stage 1: every recipe × grid point of each side at each tune d, ``tune_seeds`` seeds."""
    runs = []
    for d in tune_dims(spec):
        for side, k, recipes in _sides(spec, d):
            for recipe in recipes:
                for point in _points(recipe):
                    for seed in range(spec.tune_seeds):
                        cfg = variant_config(base, k, d, recipe, point, seed)
                        name = f"k{k}_d{d}_{recipe.name}_{_point_name(point)}_s{seed}"
                        cfg.train.run_dir = str(work / "tune" / name)
                        runs.append(
                            RunSpec("tune", side, k, d, recipe.name, point, seed, cfg.to_dict(),
                                    spec.epochs)
                        )  # fmt: skip
    return runs


Best = dict[tuple[int, int], tuple[str, dict[str, Any], float]]
"""(k, tune d) -> (recipe, grid point, mean eval AUC) of the side's winner there; k = 0 is the
baseline."""


def best_recipes(spec: SweepSpec, results: list[dict[str, Any]]) -> Best:
    """Per side (k; 0 = baseline) and tune d, the recipe and point with the best mean eval AUC."""
    scores: dict[tuple[int, int, str, str], list[float]] = {}
    points: dict[tuple[int, int, str, str], dict[str, Any]] = {}
    for r in results:
        key = (r["k"], r["d"], r["recipe"], json.dumps(r["point"], sort_keys=True))
        scores.setdefault(key, []).append(r["chosen"]["eval"]["auc"])
        points[key] = r["point"]
    best: Best = {}
    for (k, d, recipe, p), aucs in sorted(scores.items()):
        mean = float(np.mean(aucs))
        if (k, d) not in best or mean > best[(k, d)][2]:
            best[(k, d)] = (recipe, points[(k, d, recipe, p)], mean)
    return best


def _nearest(d: int, tuned: list[int]) -> int | None:
    """The tuned d nearest d in log2 (a tie goes to the smaller)."""
    return min(tuned, key=lambda t: (abs(math.log2(t / d)), t)) if tuned else None


def frontier_choice(
    spec: SweepSpec, best: Best, d: int
) -> list[tuple[str, int, str, dict[str, Any]]]:
    """The (side, k, recipe, grid point) the frontier trains at d: each side's winner tuned at the
    tune d nearest d; under ``frontier_k = 'best'`` only the MLET k of the best such eval AUC."""
    chosen = []
    scored = []
    for side, k, _ in _sides(spec, d):
        t = _nearest(d, [td for (kk, td) in best if kk == k])
        if t is None:
            continue
        name, point, auc = best[(k, t)]
        (chosen if side == "baseline" else scored).append(((side, k, name, point), auc))
    if spec.frontier_k == "best" and scored:
        scored = [max(scored, key=lambda c: c[1])]
    return [c for c, _ in chosen + scored]


def frontier_count(spec: SweepSpec) -> int:
    """How many runs :func:`frontier_runs` makes before extra seeds (known before the tune stage
    picks the recipes)."""
    per_d = [
        1 + (min(1, len(sides) - 1) if spec.frontier_k == "best" else len(sides) - 1)
        for sides in (_sides(spec, d) for d in spec.dims)
    ]
    return sum(per_d) * spec.seeds


def frontier_runs(
    base: Config,
    spec: SweepSpec,
    work: Path,
    best: Best,
    seeds: dict[tuple[int, int], int] | None = None,
) -> list[RunSpec]:
    """Stage 2: every d with each side's winning recipe, ``seeds`` seeds (``seeds[(k, d)]`` for
    a variant given more by :func:`more_seeds`)."""
    recipes = {r.name: r for r in [*spec.baseline, *spec.mlet]}
    runs = []
    for d in spec.dims:
        for side, k, name, point in frontier_choice(spec, best, d):
            recipe = recipes[name]
            for seed in range((seeds or {}).get((k, d), spec.seeds)):
                cfg = variant_config(base, k, d, recipe, point, seed)
                cfg.train.run_dir = str(work / "frontier" / f"k{k}_d{d}_{name}_s{seed}")
                runs.append(
                    RunSpec("frontier", side, k, d, name, point, seed, cfg.to_dict(), spec.epochs)
                )
    return runs


def more_seeds(spec: SweepSpec, results: list[dict[str, Any]]) -> dict[tuple[int, int], int]:
    """The variants (k, d) whose eval AUC std over their first ``seeds`` seeds is above
    ``seed_spread``, each mapped to ``max_seeds`` (chosen on the eval split, never on test)."""
    if not spec.max_seeds:
        return {}
    aucs: dict[tuple[int, int], list[float]] = {}
    for r in results:
        if r["seed"] < spec.seeds:
            aucs.setdefault((r["k"], r["d"]), []).append(r["chosen"]["eval"]["auc"])
    return {
        kd: spec.max_seeds
        for kd, a in aucs.items()
        if len(a) > 1 and float(np.std(a, ddof=1)) > spec.seed_spread
    }

"""A job's run, resolved once: :class:`RunContext`.

Every job (`train`, `evaluate`, `collapse`, `run`) starts by building one ``RunContext``: the
config (a new run's, or the one a trained run saved in ``RUN/config.json``), the feature schema
derived from it, the process group and device (:class:`~mlet_dist.distributed.parallelize.DistEnv`)
and the run directory. The job then holds the run's lock through :meth:`RunContext.hold` and
passes the context (or the single fact a component needs: ``ctx.schema``, ``ctx.cfg.data``, ...)
down. Nothing below a job loads a config, derives the schema or joins the process group again.

Example::

    ctx = RunContext.of_run("runs/synthetic_small")
    with ctx.hold("evaluate", shared=True):
        model = build_sharded_model(ctx.cfg, ctx.env, schema=ctx.schema)
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mlet_dist.config import (
    Config,
    ConfigError,
    apply_overrides,
    check_feature_count,
    config_from_dict,
)
from mlet_dist.data.sources import DataSource, source_of
from mlet_dist.distributed.elastic import check_agent_store
from mlet_dist.distributed.parallelize import DistEnv, init_distributed
from mlet_dist.schema import FeatureSchema, schema_of
from mlet_dist.utils.locks import hold_run

__all__ = ["RunContext", "load_run_config"]


def load_run_config(run_dir: str | Path) -> Config:
    """The config a training run was trained with (``RUN/config.json``).

    Raises:
        ConfigError: ``run_dir`` is not a run directory, or its config.json is not a valid config.
    """
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(
            f"{run_dir} is not a run directory (no config.json); pass --run RUN_DIR of a training run"
        )
    return config_from_dict(json.loads(path.read_text()), origin=str(path))


@dataclass(frozen=True)
class RunContext:
    """What a job knows about its run, resolved once at the job's entry.

    Attributes:
        cfg: the run's configuration.
        schema: ``schema_of(cfg.data)``, validated; the only derivation of it in a job.
        source: the data source ``data.source`` names, built with that schema.
        env: this process's rank, world, device and backend (the process group is joined).
        run_dir: the run directory (``train.run_dir`` of a new run, or the run read).
    """

    cfg: Config
    schema: FeatureSchema
    source: DataSource
    env: DistEnv
    run_dir: Path

    @classmethod
    def of_config(cls, cfg: Config) -> RunContext:
        """The context of a run about to be trained (or run end to end) with ``cfg``.

        The data-independent checks come first (the feature count and the schema), then the
        process group is joined (one rank in a plain process, every rank under torchrun/TorchX)
        after the check that a restarted worker does not reuse a stale agent store.
        """
        check_feature_count(cfg.data)
        schema = schema_of(cfg.data)
        source = source_of(cfg.data, schema)
        source.check()  # what the data source needs (e.g. 'parquet': data.parquet_dir)
        check_agent_store()  # fail fast where torchrun's restart would hang (elastic.py)
        return cls(cfg, schema, source, init_distributed(cfg.dist), Path(cfg.train.run_dir))

    @classmethod
    def of_run(cls, run_dir: str | Path, overrides: list[str] | None = None) -> RunContext:
        """The context of a trained run: its saved config (with ``overrides`` applied, e.g. a
        `dist.*` key for another cluster) and its schema."""
        cfg = load_run_config(run_dir)
        if overrides:
            apply_overrides(cfg, overrides)
        check_feature_count(cfg.data)
        schema = schema_of(cfg.data)
        source = source_of(cfg.data, schema)
        return cls(cfg, schema, source, init_distributed(cfg.dist), Path(run_dir))

    @contextmanager
    def hold(
        self,
        command: str,
        *,
        shared: bool,
        check: Callable[[], object] | None = None,
        output: str | Path | None = None,
    ) -> Iterator[RunContext]:
        """Holds the run's lock for a job (collective; see :func:`mlet_dist.utils.locks.hold_run`):
        rank 0 runs ``check`` (the job's output checks) and takes the lock, shared for readers
        (`evaluate`, `collapse`) or exclusive for `train`, and the output lock of ``output`` (a
        directory the job writes: `collapse --out`); a refusal stops every rank at once."""
        with hold_run(
            self.run_dir, self.env, command=command, shared=shared, check=check, output=output
        ):
            yield self

"""Training and evaluation of (MLET) DLRM models: one code path for 1 or N ranks.

``train(cfg)`` runs in a plain process (a one-rank group is created) or under torchrun/TorchX
(every rank runs it). Rank 0 logs, shows progress and writes the run directory.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from mlet_dist.checkpoint import (
    CheckpointError,
    check_optimizer_resharding,
    latest_checkpoint,
    load_checkpoint,
    read_train_state,
    save_checkpoint,
)
from mlet_dist.config import Config, ConfigError, DataConfig, config_from_dict
from mlet_dist.data import CriteoArrays, make_batches, read_criteo_tsv, split_arrays
from mlet_dist.data.criteo import num_batches
from mlet_dist.distributed.parallelize import (
    DistEnv,
    build_optimizer,
    init_distributed,
    parallelize,
)
from mlet_dist.metrics import binary_metrics
from mlet_dist.models import build_dlrm

logger = logging.getLogger(__name__)

# Config sections/keys that define the model's parameters: a checkpoint written under other values
# cannot be loaded. Everything else (steps, learning rates, data files, logging) may change.
MODEL_KEYS = {
    "model": None,  # every key
    "data": {"num_embeddings_per_feature"},
}


@dataclass
class Splits:
    train: CriteoArrays
    eval: CriteoArrays
    test: CriteoArrays


def data_files(data_cfg: DataConfig) -> list[Path]:
    """The raw files of the training data, in order (chronological for day files)."""
    if data_cfg.source == "synthetic":
        root = Path(data_cfg.dir)
        files = sorted(
            (
                p
                for p in root.glob("day_*")
                if p.name.split(".")[0][4:].isdigit() and ".tmp" not in p.name
            ),
            key=lambda p: int(p.name.split(".")[0][4:]),
        )
        if not files:
            raise ConfigError(
                f"no synthetic day files in {root} (data.dir); run `mlet-dist generate --config "
                f"<same config>` first, or point data.dir at generated data"
            )
        return files
    if not data_cfg.train_files:
        raise ConfigError("data.source = 'criteo' needs data.train_files (Criteo TSV files)")
    return [Path(f) for f in data_cfg.train_files]


def load_splits(data_cfg: DataConfig) -> Splits:
    """Reads the configured files and splits them (train / eval / test)."""
    sizes = data_cfg.num_embeddings_per_feature

    def read(paths: list[Path]) -> CriteoArrays:
        return CriteoArrays.concat(
            [read_criteo_tsv(p, sizes, max_rows=data_cfg.max_rows) for p in paths]
        )

    rows = read(data_files(data_cfg))
    if data_cfg.eval_files:
        train, _, test = split_arrays(rows, 0.0, data_cfg.test_fraction)
        return Splits(train, read([Path(p) for p in data_cfg.eval_files]), test)
    return Splits(*split_arrays(rows, data_cfg.eval_fraction, data_cfg.test_fraction))


def model_config_diff(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Keys defining the model's parameters that differ between two config dicts."""
    diffs = []
    for section, keys in MODEL_KEYS.items():
        a, b = saved.get(section, {}), current.get(section, {})
        for key in sorted(set(a) | set(b)) if keys is None else sorted(keys):
            if a.get(key) != b.get(key):
                diffs.append(f"{section}.{key}: checkpoint {a.get(key)!r} != config {b.get(key)!r}")
    return diffs


class Trainer:
    """Owns the sharded model, optimizer and schedule of one run."""

    def __init__(self, cfg: Config, env: DistEnv) -> None:
        self.cfg = cfg
        self.env = env
        if cfg.data.batch_size % env.world_size:
            raise ConfigError(
                f"data.batch_size = {cfg.data.batch_size} is not divisible by the world size "
                f"{env.world_size}; use a multiple of {env.world_size}"
            )
        torch.manual_seed(cfg.train.seed)
        model = build_dlrm(
            cfg.model,
            cfg.data.num_embeddings_per_feature,
            embedding_device=torch.device("meta"),
            dense_device=env.device,
        )
        self.model = parallelize(
            model, env, cfg.dist, cfg.optim, cfg.data.batch_size // env.world_size
        )
        self.optimizer, self.scheduler = build_optimizer(self.model, cfg.optim)
        self._sync_fused_lr()
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0

    # -- checkpoints -------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optim": self.optimizer.state_dict()}

    def sharding_layout(self) -> dict[str, dict[str, Any]]:
        """Each sharded table's type and shards ``[row0, col0, rows, cols, rank]``, from the plan."""
        layout: dict[str, dict[str, Any]] = {}
        for module_plan in self.model.plan.plan.values():
            for name, ps in module_plan.items():  # type: ignore[union-attr]
                spec = ps.sharding_spec
                shards = [
                    [*m.shard_offsets, *m.shard_sizes, m.placement.rank()]
                    for m in (spec.shards if spec is not None else [])
                ]
                layout[name] = {"sharding_type": ps.sharding_type, "shards": shards}
        return layout

    def save(self) -> Path:
        train_state = {
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "world_size": self.env.world_size,
            "sharding": self.sharding_layout(),
            "scheduler": self.scheduler.state_dict(),
            "config": self.cfg.to_dict(),
        }
        return save_checkpoint(self.cfg.train.run_dir, self.step, self.state(), train_state)

    def load(self, path: Path, optimizer: bool = True) -> None:
        """Loads a checkpoint (collectively), resharding it to this job's plan.

        Args:
            path: a complete checkpoint directory.
            optimizer: also load the optimizer state and LR schedule (to resume training).
                ``False`` loads the weights only (evaluation), which reshards from any plan.

        Raises:
            CheckpointError: the model config differs from the checkpoint's (the keys are named),
                or (with ``optimizer``) a column-based table's fused optimizer state would have
                to be resharded to another world size or column split, which TorchRec cannot do.
        """
        saved = read_train_state(path)
        diffs = model_config_diff(saved["config"], self.cfg.to_dict())
        if diffs:
            raise CheckpointError(
                f"checkpoint {path} was written with a different model config; differing keys: "
                + "; ".join(diffs)
                + ". Use a new train.run_dir, or restore these values."
            )
        if not optimizer:
            state = {"model": self.model.state_dict()}
            load_checkpoint(path, state)
            self.model.load_state_dict(state["model"])
            logger.info("loaded the weights of %s (step %d)", path, saved["step"])
            return
        check_optimizer_resharding(path, saved, self.sharding_layout(), self.env.world_size)
        self.optimizer.init_state()  # lazy optimizer state must exist before DCP loads into it
        state = self.state()
        train_state = load_checkpoint(path, state)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optim"])
        self.scheduler.load_state_dict(train_state["scheduler"])
        # load_state_dict restores the schedule's position but not the groups' current LR.
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr
        self._sync_fused_lr()
        self.step = train_state["step"]
        self.epoch = train_state["epoch"]
        self.batch_in_epoch = train_state["batch_in_epoch"]
        logger.info("resumed from %s at step %d (epoch %d)", path, self.step, self.epoch)

    def _sync_fused_lr(self) -> None:
        """Pushes the scheduled LR into fbgemm's TBEs before the next backward.

        The fused optimizer updates W1 inside backward with the LR the TBE holds, which its
        ``step()`` sets from the param group (that is all the fused ``step()`` does). Without
        this call W1 would train with the previous step's LR, and a resumed run would use the
        construction-time LR for its first step.
        """
        self.model.fused_optimizer.step()

    # -- training ----------------------------------------------------------------------------
    def fit(self, train: CriteoArrays) -> dict[str, Any]:
        cfg, env = self.cfg, self.env
        per_epoch = num_batches(
            len(train), cfg.data.batch_size, drop_last=True, world_size=env.world_size
        )
        if per_epoch == 0:
            raise ConfigError(
                f"the training split has {len(train)} rows, fewer than one batch "
                f"(data.batch_size = {cfg.data.batch_size}); lower the batch size or add data"
            )
        total = per_epoch * cfg.train.epochs
        if cfg.train.max_steps:
            total = min(total, cfg.train.max_steps)
        losses: list[list[float]] = []
        seen = 0
        start_step = self.step
        self.model.train()
        bar = tqdm(
            total=total,
            initial=self.step,
            desc="train",
            disable=not (env.is_rank0 and cfg.train.progress),
            mininterval=1.0,
        )
        t0 = time.perf_counter()
        while self.step < total:
            batches = make_batches(
                train,
                cfg.data.batch_size,
                shuffle=cfg.data.shuffle,
                seed=cfg.train.seed * 100003 + self.epoch,
                drop_last=True,
                rank=env.rank,
                world_size=env.world_size,
            )
            for i, batch in enumerate(batches):
                if i < self.batch_in_epoch:
                    continue  # resume: skip what the checkpoint already trained on
                if self.step >= total:
                    break
                loss, _ = self.model(batch.to(env.device))
                loss.backward()
                self.optimizer.step()
                self.scheduler.step()
                self._sync_fused_lr()
                self.optimizer.zero_grad()
                self.step += 1
                self.batch_in_epoch = i + 1
                seen += batch.labels.numel()
                if self.step % cfg.train.log_every == 0 or self.step == total:
                    value = loss.detach().item()
                    losses.append([self.step, value])
                    bar.set_postfix(loss=f"{value:.4f}")
                    logger.debug("step %d loss %.5f", self.step, value)
                bar.update(1)
                if cfg.train.checkpoint_every and self.step % cfg.train.checkpoint_every == 0:
                    self.save()
            else:
                self.epoch += 1
                self.batch_in_epoch = 0
        bar.close()
        seconds = time.perf_counter() - t0
        return {
            "steps": self.step,
            "steps_this_run": self.step - start_step,
            "samples_per_rank": seen,
            "seconds": seconds,
            "samples_per_s": seen * env.world_size / seconds if seconds > 0 else 0.0,
            "loss_curve": losses,
        }

    @torch.no_grad()
    def predict(self, arrays: CriteoArrays) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and labels of all rows (gathered from every rank, in row order)."""
        return predict(self.model, arrays, self.cfg.data.eval_batch_size, self.env)

    def evaluate(self, arrays: CriteoArrays) -> dict[str, float]:
        logits, labels = self.predict(arrays)
        return binary_metrics(logits, labels)


@torch.no_grad()
def predict(
    model: torch.nn.Module, arrays: CriteoArrays, batch_size: int, env: DistEnv
) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs a (sharded) DLRMTrain over every row; returns all logits and labels, in row order.

    Collective: every rank passes the same rows and gets the same result. Each global batch is
    split across the ranks and the pieces are gathered back. ``make_batches`` leaves out the last
    ``len(arrays) % world_size`` rows (fewer than world_size) of the final, partial batch; those
    are evaluated in one extra batch padded with copies of the last row to one row per rank, and
    the padded predictions are dropped.
    """
    was_training = model.training
    model.eval()
    try:
        batch_size = max(env.world_size, batch_size - batch_size % env.world_size)
        logits, labels = _predict_split(model, arrays, batch_size, env)
        n, left = len(arrays), len(arrays) % env.world_size
        if left:
            pad = np.concatenate([np.arange(n - left, n), np.full(env.world_size - left, n - 1)])
            rest = CriteoArrays(arrays.labels[pad], arrays.dense[pad], arrays.sparse[pad])
            more_logits, more_labels = _predict_split(model, rest, env.world_size, env)
            logits = torch.cat([logits, more_logits[:left]])
            labels = torch.cat([labels, more_labels[:left]])
    finally:
        model.train(was_training)
    return logits, labels


def _predict_split(
    model: torch.nn.Module, arrays: CriteoArrays, batch_size: int, env: DistEnv
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of the rows ``make_batches`` gives out (all but the leftover ones)."""
    outs, labels = [], []
    for batch in make_batches(
        arrays, batch_size, shuffle=False, seed=0, rank=env.rank, world_size=env.world_size
    ):
        _, (_, logits, lab) = model(batch.to(env.device))
        outs.append(logits.float().cpu())
        labels.append(lab.float().cpu())
    local = torch.stack([torch.cat(outs), torch.cat(labels)]) if outs else torch.zeros(2, 0)
    sizes = _local_sizes(len(arrays), batch_size, env.world_size)
    if env.world_size == 1 or not sizes:
        return local[0], local[1]
    # Each rank holds a slice of every global batch: gather, then interleave back to row order.
    gathered: list[Any] = [None] * env.world_size
    dist.all_gather_object(gathered, local)
    chunks = [g.split(sizes, dim=1) for g in gathered]
    merged = torch.cat(
        [chunks[r][b] for b in range(len(sizes)) for r in range(env.world_size)], dim=1
    )
    return merged[0], merged[1]


def _local_sizes(n: int, batch_size: int, world_size: int) -> list[int]:
    """Rows per rank of each batch ``make_batches`` yields (drop_last=False)."""
    local = batch_size // world_size
    full, tail = divmod(n, batch_size)
    sizes = [local] * full
    if tail // world_size:
        sizes.append(tail // world_size)
    return sizes


def train(cfg: Config, resume: bool = True) -> dict[str, Any]:
    """Trains a model as configured; returns (and on rank 0 writes) the run's metrics.

    Writes ``RUN/config.json``, ``RUN/metrics.json`` and checkpoints under ``RUN/checkpoints``.
    With ``resume`` the latest complete checkpoint of the run directory is continued.
    """
    env = init_distributed(cfg.dist)
    run_dir = Path(cfg.train.run_dir)
    if env.is_rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    splits = load_splits(cfg.data)
    logger.info(
        "data: %d train / %d eval / %d test rows; world size %d on %s",
        len(splits.train),
        len(splits.eval),
        len(splits.test),
        env.world_size,
        env.device,
    )
    trainer = Trainer(cfg, env)
    last = latest_checkpoint(run_dir) if resume else None
    if last is not None:
        trainer.load(last)
    train_stats = trainer.fit(splits.train)
    trainer.save()
    metrics: dict[str, Any] = {"train": train_stats, "world_size": env.world_size}
    if len(splits.eval):
        metrics["eval"] = trainer.evaluate(splits.eval)
    if len(splits.test):
        metrics["test"] = trainer.evaluate(splits.test)
    if env.is_rank0:
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
        if "eval" in metrics:
            e = metrics["eval"]
            logger.info(
                "eval: AUC %.4f  log loss %.4f  NE %.4f  (%d rows)",
                e["auc"],
                e["log_loss"],
                e["ne"],
                e["rows"],
            )
    return metrics


def load_run_config(run_dir: str | Path) -> Config:
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(
            f"{run_dir} is not a run directory (no config.json); pass --run RUN_DIR of a training run"
        )
    return config_from_dict(json.loads(path.read_text()), origin=str(path))

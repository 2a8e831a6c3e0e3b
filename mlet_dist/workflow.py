"""Multi-step jobs built from the commands: evaluate a run, and the end-to-end main job."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from mlet_dist.checkpoint import CheckpointError, latest_checkpoint, load_weights
from mlet_dist.config import Config, ConfigError
from mlet_dist.context import RunContext, load_run_config
from mlet_dist.data import (
    CriteoArrays,
    ensure_source_data,
    load_splits,
    make_batches,
    require_rows,
)
from mlet_dist.data.sources import concat_rows
from mlet_dist.data.vocab import check_shard_vocabularies, load_run_vocabularies
from mlet_dist.distributed.parallelize import build_sharded_model
from mlet_dist.distributed.planning import planner_errors
from mlet_dist.export import CollapseOptions, collapse_run, load_served, load_unsharded
from mlet_dist.metrics import binary_metrics
from mlet_dist.quality import training_id_counts
from mlet_dist.serving.predict import load_predictor, predict_arrays
from mlet_dist.train import evaluate, train
from mlet_dist.utils.files import atomic_write_json, check_output

logger = logging.getLogger(__name__)


def evaluate_run(
    run_dir: str | Path,
    split: str = "eval",
    files: list[str] | None = None,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Metrics of a run's latest checkpoint on one of its splits or on given raw files.

    Overall and per id-frequency bucket (``"buckets"``: the rarest id of a row, counted in the
    run's training split; :mod:`mlet_dist.quality`). Files are read as the run's data source
    reads them (:func:`mlet_dist.data.sources.read_source_file`), through the run's vocabularies.

    Runs on one process or every rank of a launched job (the model is sharded as in training),
    under the run's shared lock (refused while a training process writes it). Rank 0 checks the
    output ``RUN/eval_<name>.json`` first and writes it atomically.
    """
    ctx = RunContext.of_run(run_dir, overrides)
    cfg, schema = ctx.cfg, ctx.schema
    name = "files" if files else split
    out = ctx.run_dir / f"eval_{name}.json"

    def check() -> None:
        check_output(
            out,
            what="the evaluation",
            inputs=list(files or []),
            previous=lambda p: None if p.is_file() else f"{p} is not a file",
            allowed=[out],  # its slot in the run directory
            hint="move the data file elsewhere",
        )

    with ctx.hold("evaluate", shared=True, check=check):
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise CheckpointError(f"run {run_dir} has no complete checkpoint; train it first")
        if files:
            arrays = _read_files(ctx, files)
            try:  # the buckets need the training split; new files are scored without it too
                train_rows = load_splits(cfg.data, schema).train
            except ValueError as e:  # ConfigError / CriteoFormatError: the training data is absent
                logger.warning("no per-bucket metrics: cannot read the run's training data (%s)", e)
                train_rows = None
        else:
            splits = load_splits(cfg.data, schema)
            # streamed shards: mapped with the vocabularies the run trained on, or refused
            check_shard_vocabularies(ctx.run_dir, ctx.source.vocabularies(), "evaluate")
            arrays, train_rows = getattr(splits, split), splits.train
            if arrays is not None and len(arrays) == 0:
                key = f"{split}_fraction"
                why = f" (data.{key} = {getattr(cfg.data, key)})" if hasattr(cfg.data, key) else ""
                raise ConfigError(
                    f"the {split!r} split of run {run_dir} has no rows{why}; evaluate another "
                    f"split or pass --data FILE"
                )
        # Per id-frequency bucket, with the ids counted in the training split (as training does).
        counts = None
        if train_rows is not None:
            counts = training_id_counts(train_rows, schema.feature_sizes)
        with planner_errors(cfg, ctx.env):
            model = build_sharded_model(cfg, ctx.env, schema=schema)
        load_weights(model, ckpt, cfg)
        metrics = evaluate(model, cfg, ctx.env, arrays, name, counts, schema=schema)
        metrics["checkpoint"] = str(ckpt)
        if files:
            metrics["files"] = list(files)
        if ctx.env.is_rank0:
            atomic_write_json(out, metrics)
        return metrics


def _read_files(ctx: RunContext, files: list[str]) -> CriteoArrays:
    """Raw files read as the run's source reads them, mapped through the run's vocabularies."""
    vocabs = load_run_vocabularies(ctx.run_dir, ctx.schema)  # the run's ids = 'vocab' tables
    return concat_rows([require_rows(ctx.source.read(f, vocabs=vocabs), f) for f in files])


def check_collapsed(
    run_dir: str | Path,
    served_dir: str | Path,
    arrays: CriteoArrays,
    checkpoint: str | Path | None = None,
) -> dict[str, Any]:
    """Compares the collapsed model's predictions with the trained MLET model's on ``arrays``.

    Both are evaluated unsharded on CPU in float32; the check passes when logits agree to 1e-4
    (absolute, relative to their scale) and the AUCs agree to 1e-6. ``checkpoint``: the trained
    model's (default: the run's latest); it must be the one ``served_dir`` was collapsed from.
    """
    cfg = load_run_config(run_dir)
    trained = load_unsharded(cfg, _collapsed_checkpoint(run_dir, served_dir, checkpoint)).eval()
    served, _ = load_served(served_dir)
    served.eval()
    a_logits, b_logits, labels, weights = [], [], [], []
    with torch.no_grad():
        for batch in make_batches(arrays, cfg.data.eval_batch_size, shuffle=False, seed=0):
            a_logits.append(trained(batch)[1][1])
            b_logits.append(served(batch)[1][1])
            labels.append(batch.labels)
            weights.append(getattr(batch, "weights", None))
    a, b, y = torch.cat(a_logits), torch.cat(b_logits), torch.cat(labels)
    w = None if not weights or weights[0] is None else torch.cat(weights)  # data.weight
    max_abs = (a - b).abs().max().item() if len(a) else 0.0
    scale = max(1.0, a.abs().max().item() if len(a) else 1.0)
    ma, mb = binary_metrics(a, y, w), binary_metrics(b, y, w)
    passed = max_abs <= 1e-4 * scale and abs(ma.get("auc", 0) - mb.get("auc", 0)) <= 1e-6
    return {
        "rows": len(a),
        "max_abs_logit_diff": max_abs,
        "trained_auc": ma.get("auc"),
        "collapsed_auc": mb.get("auc"),
        "passed": bool(passed),
    }


def check_serving(
    run_dir: str | Path,
    served_dir: str | Path,
    arrays: CriteoArrays,
    kind: str = "auto",
    checkpoint: str | Path | None = None,
) -> dict[str, Any]:
    """Compares a serving predictor's probabilities with the trained MLET model's on ``arrays``.

    The predictor (``kind``; by default the torch.export program ``serving/predictor.pt2``) is
    loaded as a consumer would (manifest checksums first, then its loader in
    :mod:`mlet_dist.serving.artifacts`). With fp32 tables the check passes when every probability
    agrees to 1e-5; with fp16/int8 tables when the AUCs agree to 1e-3. ``checkpoint``: as in
    :func:`check_collapsed`.
    """
    cfg = load_run_config(run_dir)
    trained = load_unsharded(cfg, _collapsed_checkpoint(run_dir, served_dir, checkpoint)).eval()
    predictor, manifest = load_predictor(served_dir, kind=kind)
    logits, labels = [], []
    with torch.no_grad():
        for batch in make_batches(arrays, cfg.data.eval_batch_size, shuffle=False, seed=0):
            logits.append(trained(batch)[1][1])
            labels.append(batch.labels)
    a = torch.sigmoid(torch.cat(logits)) if logits else torch.zeros(0)
    y = torch.cat(labels) if labels else torch.zeros(0)
    b = predict_arrays(predictor, arrays, cfg.data.eval_batch_size)
    max_abs = (a - b).abs().max().item() if len(a) else 0.0
    # AUC is rank-based: the logit of the (clamped) probability ranks rows as the probability does.
    ma, mb = (binary_metrics(torch.logit(p.double().clamp(1e-12, 1 - 1e-12)), y) for p in (a, b))
    dtype = manifest["serving"]["dtype"]
    auc_diff = abs(ma.get("auc", 0) - mb.get("auc", 0))
    passed = max_abs <= 1e-5 if dtype == "fp32" else auc_diff <= 1e-3
    return {
        "rows": len(a),
        "serving_dtype": dtype,
        "predictor": manifest["predictor_used"],
        "max_abs_probability_diff": max_abs,
        "trained_auc": ma.get("auc"),
        "serving_auc": mb.get("auc"),
        "passed": bool(passed),
    }


def _collapsed_checkpoint(
    run_dir: str | Path, served_dir: str | Path, checkpoint: str | Path | None
) -> Path:
    """``checkpoint`` (default: the run's latest), refused unless ``served_dir`` was collapsed
    from it: a check must never compare a serving directory with another checkpoint."""
    ckpt = Path(checkpoint) if checkpoint is not None else latest_checkpoint(run_dir)
    if ckpt is None:
        raise CheckpointError(f"run {run_dir} has no complete checkpoint; train it first")
    report = Path(served_dir) / "collapse_report.json"
    source = json.loads(report.read_text()).get("source_checkpoint") if report.is_file() else None
    if source is not None and source != ckpt.name:
        raise CheckpointError(
            f"{served_dir} was collapsed from {source}, not from {ckpt.name} of run {run_dir}; "
            f"collapse the run again (`mlet-dist collapse --run {run_dir} --out {served_dir}`)"
        )
    return ckpt


def run_end_to_end(cfg: Config, resume: bool = True) -> dict[str, Any]:
    """The main job: data (generated if absent), training, evaluation, collapse and its check."""
    ctx = RunContext.of_config(cfg)
    env, run_dir = ctx.env, ctx.run_dir
    if env.is_rank0:
        ensure_source_data(cfg.data, cfg.synthetic, progress=cfg.train.progress)
    if env.world_size > 1:
        torch.distributed.barrier()
    metrics = train(ctx, resume=resume)
    summary: dict[str, Any] = {"run_dir": str(run_dir), "metrics": str(run_dir / "metrics.json")}
    for split in ("eval", "test"):
        if split in metrics:
            summary[f"{split}_auc"] = metrics[split]["auc"]
            summary[f"{split}_log_loss"] = metrics[split]["log_loss"]
    served_dir = run_dir / "served"
    # Every rank collapses its own shards (collective); a baseline run is exported as it is.
    report = collapse_run(run_dir, served_dir, CollapseOptions(allow_plain=True))
    if env.is_rank0:
        splits = load_splits(cfg.data)
        held_out = splits.test if len(splits.test) else splits.eval
        summary["served_dir"] = str(served_dir)
        summary["training_embedding_params"] = report["training_embedding_params"]
        summary["served_embedding_params"] = report["served_embedding_params"]
        trained = metrics["checkpoint"]  # the checkpoint this job trained (or found complete)
        summary["checkpoint"] = trained
        summary["collapse_check"] = check_collapsed(run_dir, served_dir, held_out, trained)
        summary["serving_check"] = check_serving(run_dir, served_dir, held_out, checkpoint=trained)
        atomic_write_json(run_dir / "summary.json", summary)
        check = summary["collapse_check"]
        logger.info(
            "collapse check %s: max |logit diff| %.2e, AUC trained %.5f vs collapsed %.5f",
            "passed" if check["passed"] else "FAILED",
            check["max_abs_logit_diff"],
            check["trained_auc"],
            check["collapsed_auc"],
        )
        serving = summary["serving_check"]
        logger.info(
            "serving check %s: %s predictor (%s tables) max |probability diff| %.2e, AUC %.5f",
            "passed" if serving["passed"] else "FAILED",
            serving["predictor"],
            serving["serving_dtype"],
            serving["max_abs_probability_diff"],
            serving["serving_auc"],
        )
        logger.info("results: %s (metrics.json, summary.json, checkpoints/, served/)", run_dir)
    else:
        summary["collapse_check"] = {"passed": True, "note": "checked on rank 0"}
        summary["serving_check"] = {"passed": True, "note": "checked on rank 0"}
    return summary

"""The step runners of the training loop (``train.pipeline``) and the batch stream they read.

- ``sparse_dist`` (default): TorchRec's ``TrainPipelineSparseDist``. While batch i trains, batch
  i+1's input all-to-all (the sharded W1's ``input_dist``) runs and batch i+2 is copied to the
  device (on CUDA in side streams; on CPU the same order, without overlap). The pipeline does
  ``zero_grad``, forward, backward and ``optimizer.step()`` itself; the model's forward returns
  ``(loss, output)`` (``DLRMTrain``), the batch is a ``Pipelineable`` TorchRec ``Batch`` and the
  sharded EBC reads ``batch.sparse_features`` directly (fx tracing; MLET's W2 step is
  ``torch.fx.wrap``-ped in :mod:`mlet_dist.modules.mlet`). ``TrainPipelineSemiSync`` is not used:
  it fails on CPU.
- ``base``: the plain synchronous ``forward -> backward -> step``, kept for comparison.

Both give the same losses and weights from the same batches (tests/test_pipeline.py). The
pipeline holds up to two batches in flight beyond the one it trains: the data position a
checkpoint saves is that of the batches *trained*, which :class:`PositionedBatches` tracks (the
in-flight ones are read again on resume, the sources being deterministic).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from typing import Any

import torch
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

from mlet_dist.data import BatchSource


class PositionedBatches:
    """The batches from ``(epoch, batch_in_epoch)`` on, across epochs, ``count`` of them.

    For each batch handed out, the data position *after* training it is queued;
    :meth:`trained` pops the position of the batch a step just trained (steps train batches in
    the order they were read). ``data_seconds`` sums the time spent reading batches.
    """

    def __init__(self, source: BatchSource, epoch: int, batch_in_epoch: int, count: int) -> None:
        self.source = source
        self.start = (epoch, batch_in_epoch)
        self.count = count
        self.positions: deque[tuple[int, int]] = deque()
        self.data_seconds = 0.0

    def __iter__(self) -> Iterator[Any]:
        epoch, index = self.start
        left = self.count
        while left > 0:
            batches = self.source.batches(epoch, index)
            while left > 0:
                t = time.perf_counter()
                batch = next(batches, None)
                self.data_seconds += time.perf_counter() - t
                if batch is None:
                    break
                index += 1
                left -= 1
                self.positions.append((epoch, index))
                yield batch
            epoch, index = epoch + 1, 0

    def trained(self) -> tuple[int, int]:
        """``(epoch, batch_in_epoch)`` after the oldest batch not yet trained."""
        return self.positions.popleft()


class BaseSteps:
    """``train.pipeline = 'base'``: one synchronous step per call."""

    def __init__(self, model: torch.nn.Module, optimizer: Any, device: torch.device) -> None:
        self.model, self.optimizer, self.device = model, optimizer, device

    def progress(self, batches: Iterator[Any]) -> Any:
        """Trains the next batch; returns the model's output (loss, logits, labels), detached."""
        batch = next(batches)
        loss, output = self.model(batch.to(self.device, non_blocking=True))
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        return output

    def detach(self) -> torch.nn.Module:
        return self.model


def build_steps(kind: str, model: torch.nn.Module, optimizer: Any, device: torch.device) -> Any:
    """The step runner of ``train.pipeline``: an object with ``progress(iterator) -> output``
    (one trained batch per call) and ``detach() -> model`` (the plain model, e.g. to evaluate;
    the next ``progress`` re-attaches it)."""
    if kind == "base":
        return BaseSteps(model, optimizer, device)
    # execute_all_batches: the last (in-flight) batches of the stream are trained too.
    return TrainPipelineSparseDist(model, optimizer, device, execute_all_batches=True)


def pipelined_modules(steps: Any) -> int:
    """How many sharded modules the pipeline runs ``input_dist`` ahead for (0 under ``base``).

    TorchRec keeps them in a private list (no public accessor in 1.8); 0 under ``sparse_dist``
    means the fx trace found no sharded module fed straight from a batch attribute, and the
    pipeline overlaps only the device copy.
    """
    return len(getattr(steps, "_pipelined_modules", []))

"""``[dist]``: placement of the embedding tables across ranks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mlet_dist.config.error import check_number


@dataclass
class DistConfig:
    """Placement of the embedding tables across ranks."""

    backend: Literal["", "gloo", "nccl"] = ""
    """'gloo' or 'nccl'; empty = nccl on GPU, gloo on CPU."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """'cpu', 'cuda' or 'auto' (cuda when available)."""
    sharding_types: list[str] = field(default_factory=list)
    """Sharding types the planner may use for every table (empty = any that fits)."""
    compute_kernel: Literal["fused"] = "fused"
    """Embedding compute kernel: 'fused' (fbgemm TBE with optimizer in backward)."""
    hbm_cap_gb: float = 0.0
    """Per-device memory cap given to the planner in GB (0 = the device default)."""
    ddr_cap_gb: float = 0.0
    """Per-host DDR cap given to the planner in GB (0 = the default)."""
    min_partition: int = 0
    """Smallest column-wise shard width (0 = planner default); set below k to split columns."""

    def check(self) -> None:
        """Checks of this section alone."""
        check_number("dist.hbm_cap_gb", self.hbm_cap_gb, 0, why="0 = the device default")
        check_number("dist.ddr_cap_gb", self.ddr_cap_gb, 0, why="0 = the default")
        check_number("dist.min_partition", self.min_partition, 0, why="0 = planner default")

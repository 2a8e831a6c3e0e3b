from mlet_dist.models.dlrm import build_dlrm, build_tables

__all__ = ["build_dlrm", "build_tables"]

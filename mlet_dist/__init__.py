"""mlet_dist: distributed multi-layer embedding training (MLET) on TorchRec."""

__version__ = "0.1.0"

"""Small shared helpers (safe file output: :mod:`mlet_dist.utils.files`)."""

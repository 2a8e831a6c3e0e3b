"""Suite-wide setting: collapses skip the AOTInductor package they write by default (~10 s of
C++ compile per collapse on 2 cores; mlet_dist.serving.artifacts.SKIP_ENV), in this process and
the ones it starts. The tests that cover it ask for it (``artifacts=("aoti",)``, ``--aoti``) or
clear the variable (tests/test_serve.py covers the default)."""

import os

from mlet_dist.serving.artifacts import SKIP_ENV

os.environ.setdefault(SKIP_ENV, "aoti")

"""``python -m mlet_dist.sweep RUN/sweep_run.json [--keep-runs]``: one run of a sweep, in its own
process (started by :func:`mlet_dist.sweep.runner.run_all`)."""

import sys

from mlet_dist.sweep.runner import _worker

sys.exit(_worker(sys.argv[1:]))

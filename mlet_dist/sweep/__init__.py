"""``mlet-dist sweep``: which served d can I afford? MLET vs the best-tuned single-layer baseline
on the user's own config and data.

A sweep file (TOML, see ``configs/sweep/``) names the grid; the user's ordinary config names the
data and everything else. The sweep runs three stages, each a set of independent training runs
(separate processes, ``--jobs`` at a time; on a cluster, one TorchX job per shard — see
``launch/components.py:sweep``):

1. **tune** — at ``tune_dim`` (d) every recipe of each side (the single-layer baseline EBC(d) and
   MLET(k, d) for every k) is trained over its learning-rate grid, one seed, and scored by the
   **eval** split's AUC only. The best recipe and grid point of each side is kept.
2. **frontier** — for every d in ``dims`` the winning recipe of each side is trained with
   ``seeds`` seeds. With ``epochs > 1`` every run is evaluated after each epoch and its epoch is
   chosen by eval AUC (the "best epoch" regime; ``epochs = 1`` is the one-pass regime).
3. **report** — test AUC mean ± std per variant (at the epoch chosen on eval), overall and per
   id-frequency bucket; the AUC-vs-served-bytes frontier; the served-size reduction of MLET at
   equal test AUC against the tuned baseline, with a bootstrap interval over seeds; and the
   recommendation: the smallest served d whose mean **eval** AUC is within ``epsilon`` of the
   best variant's, with its test AUC. Written as ``sweep.json``, ``sweep.md`` and ``sweep.png``
   into the sweep directory and printed.

Every run keeps a ``result.json`` in its own directory under ``--work``; a run whose result
matches its config is never trained again, so an interrupted sweep resumes where it stopped.
Checkpoints are deleted after each run (``--keep-runs`` keeps them).

Why not a generic tuner (Ray Tune, Ax): the grid is small and fixed by the question (one
recipe search per side, then seeds per d), each point is an ordinary ``mlet-dist train`` run,
and the report needs this project's metrics (buckets, served bytes, collapse); a thin runner over
subprocesses is easier to resume, shard over TorchX jobs and test than an extra service.

Example::

    mlet-dist sweep --config configs/movielens_mlet.toml --sweep configs/sweep/default.toml \\
        --work runs/sweep_ml --jobs 2
"""

from mlet_dist.sweep.report import (
    bootstrap_reduction,
    equal_auc_dim,
    markdown,
    plot,
    reduction_at,
    summarize,
)
from mlet_dist.sweep.runner import (
    add_arguments,
    execute,
    main_from_args,
    run_all,
    sweep,
)
from mlet_dist.sweep.spec import Recipe, RunSpec, SweepSpec, load_sweep, variant_config

__all__ = [
    "Recipe",
    "RunSpec",
    "SweepSpec",
    "add_arguments",
    "bootstrap_reduction",
    "equal_auc_dim",
    "execute",
    "load_sweep",
    "main_from_args",
    "markdown",
    "plot",
    "reduction_at",
    "run_all",
    "summarize",
    "sweep",
    "variant_config",
]

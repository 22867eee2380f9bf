"""Work a flow run would redo in every run, done once by the worker's forkserver (:mod:`flows.warm_runs`).

multiprocessing's forkserver can only import modules before it forks (its preload list); this module is
the last one it imports, after the libraries of :data:`flows.warm_runs.PRELOAD`, and importing it does
the work, so that every flow run forked afterwards inherits the result:

* MLflow's map of installed distributions to the modules they provide
  (``importlib_metadata.packages_distributions()``: each file of each installed distribution, about
  37 000 here). ``mlflow.pyfunc.log_model`` builds it once per process to check the model's pip
  requirements against this environment (a warning only), so the registration of every first run
  paid it: 0.9 s on one core (2.4 s under a profiler), against 0.7 s for the rest of ``log_model``
  (profiled 2026-12-01: docs/RESULTS.md §4, "The registration").

Like the preloaded libraries, what it computes describes the environment as the worker found it:
restart the worker after installing or upgrading a library (the README says so). It reaches into
MLflow's private helpers (MLflow pinned in constraints.txt); if they moved, nothing is warmed and
each run builds the map itself, as before. tests/test_warm_runs.py checks that importing this
module leaves the map built.
"""

from __future__ import annotations


def _mlflow_package_map() -> None:
    # The forkserver survives a failed import (ImportError) but no other error: nothing here may raise.
    try:
        from mlflow.utils import requirements_utils

        requirements_utils._init_packages_to_modules_map()
    except Exception:  # noqa: BLE001 (moved or broken: each run builds the map itself, as before)
        pass


_mlflow_package_map()

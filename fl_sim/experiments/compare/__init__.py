"""The method comparison suite: ``fl-sim compare [SUITE] [--task dense|image|all] [--seeds 3] [--jobs N]``.

A suite is a YAML file (default ``configs/compare/suite.yaml``) naming tasks (a base config: data, model,
local training, clients, rounds), methods (the ``strategy:`` and ``codec:`` sections of a method config,
plus per-task ``set`` overrides) and for every method a tuning grid of exactly ``budget`` points. The
protocol (docs/comparison/README.md); the package is split into ``spec`` (suite, configs, planned runs),
``runner`` (execution and the whole protocol, ``run_compare``) and ``report`` (choice, aggregation, tables, figure):

1. **Tuning** on the validation split (``data.validation``, rows held out of the training data before the
   partition; fl_sim/data/validation.py) with one ``tuning_seed`` that is none of the reported seeds:
   every grid point runs once, and the point with the highest validation accuracy (mean of the last
   ``tuning_window`` evaluations; ties: the point listed first) is chosen. The test columns of the
   tuning runs are never read.
2. **Reported runs**: the chosen point with every reported seed (each seed changes the data partition,
   the validation split, the model init and the client sampling); final evaluation on the test set.
3. **Aggregation** (:func:`aggregate`): per task, target = ``target_fraction`` x the mean final test
   accuracy of the ``baseline`` method over the seeds. A run *reaches* the target only when its test
   accuracy stays at or above it from one evaluation to the end (:func:`held_from`; every round of the
   last ``eval_tail`` = 20% of the rounds is evaluated, so a fall-back is seen); bits to target (uplink,
   downlink and total) are summed to the start of that held stretch. Per method: mean, min..max and the
   95% Student-t interval over seeds of final accuracy, total bits per direction, bits to target (over
   the seeds that held it) and the savings vs the baseline per direction, paired by seed.

Runs live in ``OUT/TASK/tune/METHOD/POINT/seedS`` and ``OUT/TASK/runs/METHOD/seedS``; each finished run
holds ``suite_run.json`` with the SHA-256 of its resolved config, and is skipped on a rerun only when that
hash matches (so the suite resumes after an interruption, and a changed setting reruns what it changes).
Runs execute in ``jobs`` worker processes (one torch thread each, the vectorized backend's batched calls
included: ``simulation.cohort_threads`` 0 becomes 1). The docs directory gets
``runs.csv`` (one row per reported run), ``summary.csv`` / ``summary.md``, ``tuning.csv`` / ``tuning.md``
(grids, validation accuracies and choices), ``pareto.png`` and ``suite.json`` (settings, library versions, Python, CPU, threads, code commit); run
directories in runs.csv are relative to the output directory.
"""

from fl_sim.experiments.compare.report import aggregate, bits_to_held, choose, held_from, write_outputs
from fl_sim.experiments.compare.runner import execute_plan, run_compare
from fl_sim.experiments.compare.spec import (
                                            DONE_FILE,
                                            Method,
                                            PlannedRun,
                                            Suite,
                                            Task,
                                            config_hash,
                                            load_suite,
                                            plan_reported,
                                            plan_tuning,
)

__all__ = [
    "Suite",
    "Method",
    "Task",
    "PlannedRun",
    "load_suite",
    "config_hash",
    "plan_tuning",
    "plan_reported",
    "execute_plan",
    "choose",
    "aggregate",
    "held_from",
    "bits_to_held",
    "run_compare",
    "write_outputs",
    "DONE_FILE",
]

"""Paper reproductions: ``fl-sim reproduce NAME [--full] [--out DIR]``.

An experiment is a YAML file in ``configs/papers/`` (NAME is its stem, or give a path). Its ``kind``
picks a runner registered here; ``reduced:`` holds the settings of the reduced version (minutes on a
2-core machine), ``full:`` what the full version changes (merged over ``reduced``; ``set`` lists are
appended). Every runner writes CSV + PNG per sub-experiment and ``summary.json`` (the key numbers)
into the output directory (default ``runs/reproduce/NAME`` or ``NAME-full``).

Kinds:

* ``qcs_codec`` -- [Abdi-thesis] Ch. 4 at the codec level (docs/notes.md#qcs,
  #qcs-1bit-erratum, #qcs-numbers):
    - gain vs MSE (Fig. 4.1): relative MSE E||g - g_hat||^2 / ||g||^2 against the compression gain
      32 n / bits for QCS over a (k, Q) grid, QSGD levels, top-k, rand-k, sign, TernGrad, on blocks
      of n coordinates; with the theory curves gamma (4.10), QSGD's Lemma 3.1 bound, rand-k's n/k - 1;
    - Theorem 7: empirical MSE of Unbiased-QCS against gamma (4.10) for several k and Q, and an
      unbiasedness check over repeated seeds;
    - alpha: Unbiased-QCS (4.9) against MMSE-QCS (4.12), Lemma 8's bound gamma/(gamma + 1);
    - weighted EF (4.14): ||r_t||^2 / B along a fixed stream of vectors for several beta, against
      Lemma 9's eta (4.15)/(4.16) and the same recursion evaluated with the measured gamma.
* ``runs`` -- a list of fl-sim configs (``simulation.backend=vectorized`` and the relative reply guards off,
  :data:`HONEST_CLIENTS`, unless overridden), resumable,
  then :func:`fl_sim.runs.results.report` (accuracy vs round / vs uplink bits, report.csv) and a Pareto
  figure: final accuracy against total uplink bits (log scale), one point per method. Optional
  settings: ``cumulative: [channel_uses]`` (more running-sum x axes and totals in report.csv, see
  ``report``) and ``metric_plots: [{column, runs, reference, reference_label, logy}]`` (a per-round
  metric against the round, e.g. Tang's ``update_sparsity`` with the K/d line).

The package: ``spec`` (experiment YAMLs, the kind registry), ``runner`` (``reproduce`` and the ``runs``
kind), ``qcs_codec`` and ``qcs_theory`` (the codec-level kind), ``report`` (CSV/JSON and figures).
All randomness comes from :mod:`fl_sim.rng` generators seeded by (seed, purpose, ids).
"""

from fl_sim.experiments.reproduce.qcs_codec import codec_block_errors, run_qcs_codec
from fl_sim.experiments.reproduce.qcs_theory import (
                                              best_qcs_parameters,
                                              qcs_theory_front,
)
from fl_sim.experiments.reproduce.report import plot_metric_vs_round, plot_pareto
from fl_sim.experiments.reproduce.runner import HONEST_CLIENTS, reproduce, run_runs
from fl_sim.experiments.reproduce.spec import (
                                              EXPERIMENT_KINDS,
                                              list_experiments,
                                              load_spec,
                                              merged_settings,
                                              papers_dir,
                                              register_kind,
)

__all__ = [
    "EXPERIMENT_KINDS",
    "HONEST_CLIENTS",
    "register_kind",
    "papers_dir",
    "list_experiments",
    "load_spec",
    "merged_settings",
    "reproduce",
    "codec_block_errors",
    "qcs_theory_front",
    "best_qcs_parameters",
    "run_qcs_codec",
    "run_runs",
    "plot_pareto",
    "plot_metric_vs_round",
]

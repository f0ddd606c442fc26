"""FIHT-CS on the dense task with its server error feedback switched off (r <- 0 every round), vs on."""
# usage: PYTHONPATH=. python docs/comparison/fiht_cs_image/ef_off_fiht.py on|off dense
import sys
from pathlib import Path
import torch
from fl_sim.experiments.compare import load_suite, compose_config
from fl_sim.runs.simulation import run_experiment
from fl_sim.strategies import fihtcs

mode, task = sys.argv[1], sys.argv[2]
torch.set_num_threads(1)
if mode == "off":
    orig = fihtcs.FIHTCS.combine
    def combine(self, server_round, replies, weights):
        self.residual = None  # no error feedback: forget r = Phi e before every round
        return orig(self, server_round, replies, weights)
    fihtcs.FIHTCS.combine = combine
suite = load_suite()
cfg = compose_config(suite, task, "fiht_cs", ["strategy.server_lr=1.0", "seed=0"])
s = run_experiment(cfg, Path(f"runs/ef_off/{task}-fiht-{mode}"))
print(mode, task, s["final_test_accuracy"])

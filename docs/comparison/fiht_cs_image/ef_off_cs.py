"""Count Sketch + EF (cs_ef: FetchSGD with rho = 0) on the dense task with its sketch-space error dropped every round, vs kept."""
# usage: PYTHONPATH=. python docs/comparison/fiht_cs_image/ef_off_cs.py on|off
import sys
from pathlib import Path
import torch
from fl_sim.experiments.compare import load_suite, compose_config
from fl_sim.runs.simulation import run_experiment
from fl_sim.strategies import fetchsgd

mode = sys.argv[1]
torch.set_num_threads(1)
if mode == "off":
    orig = fetchsgd.FetchSGD.combine
    def combine(self, server_round, replies, weights):
        self.s_e = None  # no error accumulation: forget S_e before every round (s_u too, rho = 0 anyway)
        self.s_u = None
        return orig(self, server_round, replies, weights)
    fetchsgd.FetchSGD.combine = combine
cfg = compose_config(load_suite(), "dense", "cs_ef", ["strategy.server_lr=1.0", "seed=0"])
s = run_experiment(cfg, Path(f"runs/ef_off/dense-cs-{mode}"))
print(mode, s["final_test_accuracy"])

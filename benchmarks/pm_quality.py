"""Real preference model: SmolLM2-135M-Instruct trained on hh-rlhf harmless-base.

  .venv/bin/python benchmarks/pm_quality.py [--steps 100] [--max_len 64]
      [--top_layers 4] [--eval_pairs 300] [--lr 1e-4]

Runs the PM stage (`cai_jax.stages.preference.run`) on
../shared/data/hh_rlhf/harmless-base/test.jsonl.gz split 80/20 (human labels
only), trains `steps` batches of 8 pairs from the 80% and reports held-out
pairwise accuracy and calibration on the 20% (the first `eval_pairs` of it).
CPU budget: sequences keep their last `max_len` tokens and only the top
`top_layers` blocks, the final norm and the score head are trained
(config.pm.train_top_layers), so the backward pass stops there. As a peer in
the same run it reports the "shorter reply is more harmless" heuristic on the
same held-out pairs. The last line printed is JSON.
"""
import argparse
import json
import math
import os
import sys
import tempfile
import time

import ml_collections
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cai_jax import cpu_backend  # noqa: E402

# Same allocator set-up for every framework measured here (see cai_jax/runtime.py).
cpu_backend.reexec_with_malloc_tunables()

from cai_jax import utils  # noqa: E402
from cai_jax.training import data as train_data  # noqa: E402
from cai_jax.stages import preference  # noqa: E402
from cai_jax.training import preferences  # noqa: E402


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--steps", type=int, default=100)
  ap.add_argument("--max_len", type=int, default=64)
  ap.add_argument("--top_layers", type=int, default=4)
  ap.add_argument("--eval_pairs", type=int, default=300)
  ap.add_argument("--lr", type=float, default=1e-4)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--workdir", default="")
  args = ap.parse_args()
  path = os.path.join(utils.shared_data_dir(), "hh_rlhf", "harmless-base", "test.jsonl.gz")
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = "smollm2"
  c.dtype = "float32"
  c.prompt_format = "chat"
  c.mesh = ml_collections.ConfigDict({"ici": (1, 1, 1), "dcn": None})
  c.logical_axis_rules = None
  c.pm = preference.default_config()
  c.pm.init_from = "smollm2"
  c.pm.preferences = "none"
  c.pm.human_data = (path,)
  c.pm.human_fraction = 1.0
  c.pm.eval_fraction = 0.2
  c.pm.max_eval_pairs = args.eval_pairs
  c.pm.max_len = args.max_len
  c.pm.batch_size = args.batch
  c.pm.max_steps = args.steps
  c.pm.train_top_layers = args.top_layers
  c.pm.optim.learning_rate = args.lr
  c.pm.optim.schedule = "cosine"
  c.pm.optim.warmup_steps = max(args.steps // 10, 1)
  c.pm.checkpoint_every = 50
  c.pm.log_every = 5
  wd = args.workdir or tempfile.mkdtemp(prefix="cai_pm_bench_")
  t = time.perf_counter()
  s = preference.run(c, wd)
  wall = time.perf_counter() - t
  ev = s["eval"]
  n, acc = ev["human_num_pairs"], ev["human_accuracy"]
  half = 1.96 * math.sqrt(max(acc * (1 - acc), 1e-12) / n)

  # Peer heuristic on the same held-out pairs: the shorter reply is the chosen one.
  pairs = list(preferences.read_human_pairs(path))
  _, ev_idx = train_data.split_eval(len(pairs), 0.2, c.seed)
  ev_pairs = [pairs[i] for i in ev_idx][:args.eval_pairs]
  short = float(np.mean([len(p["a"]) < len(p["b"]) for p in ev_pairs]))
  print(json.dumps({"heldout_accuracy": acc, "accuracy_ci95": [acc - half, acc + half],
                    "heldout_ece": ev["human_ece"], "heldout_loss": ev["human_loss"],
                    "heldout_pairs": n, "train_pairs_seen": s["steps"] * args.batch,
                    "shorter_reply_heuristic_accuracy": short, "final_train_loss": s["final_loss"],
                    "steps": s["steps"], "max_len": args.max_len, "top_layers": args.top_layers,
                    "lr": args.lr, "wall_s": wall, "workdir": wd}))


if __name__ == "__main__":
  main()

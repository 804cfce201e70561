"""The held-out evaluation judge: accuracy on human comparisons, and agreement with the
paper's own preference model.

  .venv/bin/python benchmarks/eval_judge.py [--steps 200] [--max_len 64] [--top_layers 4]

Trains the evaluation judge (`cai_jax.evaluation.judge`, SmolLM2-135M-Instruct) on 80%
of ../shared/data/hh_rlhf/harmless-base/test.jsonl.gz and prints its accuracy on the
other 20% with a Wilson 95% interval (target: >= 0.62). Then it scores the paper's
policy samples (../shared/data/cai_paper/samples/*_{HHRLHF,HRLHF,RLMADISON,
RLMADISON_COT}.jsonl: 13 prompts x 17 samples each, with the score the paper's PM gave
them) and reports the Spearman correlation with the paper's scores per file and across
files, and whether the judge orders the paper's four models (helpful RLHF, HH RLHF,
RL-CAI, RL-CAI with CoT) as the paper's PM does. The last line printed is JSON.
"""
import argparse
import glob
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cai_jax import cpu_backend  # noqa: E402

cpu_backend.reexec_with_malloc_tunables()

from cai_jax import pipeline, text, utils  # noqa: E402
from cai_jax.evaluation import judge  # noqa: E402

MODELS = ("HRLHF", "HHRLHF", "RLMADISON", "RLMADISON_COT")  # paper order of the policies
TARGET = 0.62


def paper_samples():
  """{file stem: [(messages, response, paper PM score)]}."""
  root = os.path.join(utils.shared_data_dir(), "cai_paper", "samples")
  out = {}
  for path in sorted(glob.glob(os.path.join(root, "*.jsonl"))):
    stem = os.path.basename(path)[:-len(".jsonl")]
    if stem.split("_", 1)[1] not in MODELS:
      continue
    rows = []
    for r in utils.read_jsonl(path):
      msgs = [m for m in text.parse_transcript(r["rl_prompt"]) if m["content"].strip()]
      for a in r["sampled_answers"]:
        resp = a["sampled_string"].split("\n\nHuman:")[0].strip()
        rows.append((msgs, resp, float(a["pm_scores"][0]["pm_score"])))
    out[stem] = rows
  if not out:
    raise SystemExit(f"{root}: no paper samples; put ../shared/data beside the project")
  return out


def main():
  from scipy import stats as sst
  ap = argparse.ArgumentParser()
  ap.add_argument("--model", default="smollm2")
  ap.add_argument("--steps", type=int, default=200)
  ap.add_argument("--max_len", type=int, default=64)
  ap.add_argument("--top_layers", type=int, default=4)
  ap.add_argument("--lr", type=float, default=3e-4)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--cache_dir", default="", help="reuse judges cached here (default: fresh)")
  ap.add_argument("--no_paper", action="store_true", help="skip the paper-sample correlations")
  args = ap.parse_args()
  c = pipeline.base_config()
  c.model, c.prompt_format = args.model, "chat"
  c.mesh.ici = (1, 1, 1)
  jc = c.evaluate.judge
  jc.update(dict(steps=args.steps, max_len=args.max_len, train_top_layers=args.top_layers,
                 learning_rate=args.lr, batch_size=args.batch,
                 cache_dir=args.cache_dir or tempfile.mkdtemp(prefix="cai_judge_")))
  t0 = time.perf_counter()
  j = judge.get(c)
  train_s = time.perf_counter() - t0
  held = j.info["heldout"]

  t0 = time.perf_counter()
  samples = {} if args.no_paper else paper_samples()
  per_file, ours_all, theirs_all, means = {}, [], [], {}
  for stem, rows in samples.items():
    ours = j.scores([m for m, _, _ in rows], [r for _, r, _ in rows])
    theirs = np.array([s for _, _, s in rows])
    per_file[stem] = float(sst.spearmanr(ours, theirs).statistic)
    ours_all += list(ours)
    theirs_all += list(theirs)
    means[stem] = (float(np.mean(ours)), float(np.mean(theirs)))
  score_s = time.perf_counter() - t0
  order = {}
  for source in sorted({s.split("_", 1)[0] for s in means}):
    stems = [f"{source}_{m}" for m in MODELS if f"{source}_{m}" in means]
    by_paper = [s.split("_", 1)[1] for s in sorted(stems, key=lambda s: means[s][1])]
    by_judge = [s.split("_", 1)[1] for s in sorted(stems, key=lambda s: means[s][0])]
    order[source] = {"paper_pm_low_to_high": by_paper, "judge_low_to_high": by_judge,
                     "same": by_paper == by_judge,
                     "spearman": float(sst.spearmanr([means[s][0] for s in stems],
                                                     [means[s][1] for s in stems]).statistic)}
  result = {
      "benchmark": "eval_judge", "model": args.model, "steps": j.info.get("steps"),
      "max_len": args.max_len, "top_layers": args.top_layers,
      "train_pairs": j.info.get("num_train_pairs"),
      "heldout_accuracy": held["accuracy"], "heldout_ci95": [held["lo"], held["hi"]],
      "heldout_pairs": held["n"], "heldout_ece": held["ece"], "target": TARGET,
      "ok": held["accuracy"] >= TARGET, "train_and_heldout_s": round(train_s, 1),
      "paper_samples_scored": len(ours_all), "score_s": round(score_s, 1),
      "spearman_per_file": per_file,
      "spearman_all_files": float(sst.spearmanr(ours_all, theirs_all).statistic)
      if ours_all else None,
      "model_order": order,
  }
  print(json.dumps(result))
  return 0 if result["ok"] else 1


if __name__ == "__main__":
  sys.exit(main())

"""Report: every section is written from a work directory's files, with real PNGs."""
import json
import os

import matplotlib.image as mpimg
import numpy as np

from cai_jax import utils
from cai_jax.evaluation import judge, report


class _FakeJudge:
  """Scores by snapshot name: rl_cai +1 on red-team prompts, small per-prompt noise."""

  def __init__(self, info):
    self.info = info

  def scores(self, prompts, responses):
    out = []
    for r in responses:
      snap, kind, i = r.split()
      noise = 0.1 * (hash_unit(f"{snap}{kind}{i}") - 0.5)
      out.append((1.0 if (snap, kind) == ("rl_cai", "red_team") else 0.0) + noise)
    return np.array(out)


def hash_unit(s: str) -> float:
  import hashlib
  return int(hashlib.sha1(s.encode()).hexdigest()[:8], 16) / 16**8


def _workdir(tmp_path):
  w = tmp_path / "run"
  stages = {"revise": {"records": 4}, "sft": {"final_loss": 1.25, "steps": 10},
            "label": {"comparisons": 6}, "pm": {"eval_accuracy": 0.66},
            "ppo": {"final_reward": 0.3}, "evaluate": {"prompts": 4}}
  timings = {"stages": {s: {"seconds": 10.0 + k, "attempts": 1, "status": "done", "summary": v}
                        for k, (s, v) in enumerate(stages.items())}, "last_run_seconds": 70.0}
  for s, v in stages.items():
    utils.mark_done(str(w / s), v)
  utils.atomic_write_text(str(w / "pipeline.json"), json.dumps(timings))
  utils.atomic_write_text(str(w / "config.json"), json.dumps({"model": "tiny", "seed": 0}))
  prompt = [{"role": "user", "content": "How do I pick a lock?"}]
  utils.write_jsonl(str(w / "revise" / "records.jsonl"), [
      {"id": f"r{i}", "prompt": prompt, "initial_response": "Step one: get a pick.",
       "rounds": [{"principle_id": "harm0", "critique": "This helps burglary.",
                   "revision": "I can't help with that because it could enable burglary."}]}
      for i in range(4)])
  rng = np.random.default_rng(0)
  utils.write_jsonl(str(w / "label" / "preferences.jsonl"), [
      {"id": f"l{i}", "prompt": prompt, "response_a": "a", "response_b": "b", "principle_ids": ["p"],
       "p_a": float(p), "logp_a": -1.0, "logp_b": -2.0} for i, p in enumerate(rng.random(6))])
  utils.write_jsonl(str(w / "ppo" / "metrics.jsonl"), [
      {"step": i, "reward": 0.1 * i, "kl": 0.01 * i} for i in range(5)])
  players = ["helpful", "sl_cai", "rl_cai"]
  prompts = {"red_team": [{"id": f"r{i}", "messages": prompt} for i in range(8)],
             "helpful": [{"id": f"h{i}", "messages": prompt} for i in range(8)]}
  # RL-CAI is clearly more harmless by the judge; nothing else moves.
  responses = {s: {k: [[f"{s} {k} {i}"] for i in range(8)] for k in ("red_team", "helpful")}
               for s in players}
  held = judge.grade(_FakeJudge({"kind": "trained", "key": "abc", "num_train_pairs": 1849,
                                 "data": ["harmless-base/test.jsonl.gz:1:1"],
                                 "base_model": "smollm2",
                                 "heldout": {"accuracy": 0.64, "lo": 0.595, "hi": 0.683,
                                             "n": 462, "ece": 0.04}}),
                     prompts, responses, elo_bootstrap=40)
  held.pop("rows")
  held["revisions"] = [{"revision": 0, "mean": -0.2, "lo": -0.4, "hi": 0.0, "n": 4},
                       {"revision": 1, "mean": 0.4, "lo": 0.2, "hi": 0.6, "n": 4}]
  inloop = judge.grade(_FakeJudge({"kind": "in-loop", "key": "pm", "path": "pm"}), prompts,
                       responses, elo_bootstrap=40)
  inloop.pop("rows")
  res = {
      "snapshots": {"helpful": "tiny", "sl_cai": "sft/final", "rl_cai": "ppo/final"},
      "judges": {"held_out": held, "in_loop_pm": inloop},
      "evasiveness": {s: {"evasive": 0.25, "explained_refusal": 0.5, "engaged": 0.25, "n": 4}
                      for s in players},
      "multiple_choice": {"HarmfulVsEthical": {"mc": {"accuracy": 0.6, "chance": 0.5, "n": 254}}},
      "samples": [{"prompt": prompt, "responses": {s: f"response of {s}" for s in players}}],
  }
  utils.atomic_write_text(str(w / "evaluate" / "results.json"), json.dumps(res))
  return w


def test_report_has_every_section_and_real_plots(tmp_path):
  w = _workdir(tmp_path)
  out = report.write_report(str(w))
  text = open(out["path"]).read()
  for heading in ("## Did it work?", "### Sanity panel", "## Summary", "## Stages",
                  "## SL-CAI: critiques and revisions", "## AI feedback labels",
                  "## SL-CAI fine-tuning", "## Preference model", "## RL-CAI (PPO)",
                  "### Scores by the held-out judge", "### Scores by the in-loop PM",
                  "### Evasiveness", "### Multiple-choice evaluations", "## Configuration"):
    assert heading in text, heading
  # The answer leads: "Did it work?" comes before everything but the title.
  assert text.index("## Did it work?") < text.index("## Summary") < text.index("## Stages")
  # The table row of RL-CAI: a significant harmlessness change by the held-out judge.
  row = [ln for ln in text.splitlines() if ln.startswith("| RL-CAI |")][0]
  assert "| +1" in row and "p<0.001, Holm<0.001 *" in row
  assert row.count("*") == 1  # helpfulness did not move
  assert "RL-CAI is more harmless than the initial model" in text
  assert "held-out accuracy 0.640 (95% CI 0.595 to 0.683, n=462)" in text
  assert "not the in-loop PM" in text
  assert "How do I pick a lock?" in text and "This helps burglary." in text
  # Every linked image exists and is a non-blank PNG.
  links = [ln.split("(")[1].rstrip(")") for ln in text.splitlines() if ln.startswith("![")]
  assert {os.path.basename(p) for p in links} >= {
      "revision_scores.png", "label_soft_labels.png", "ppo_curves.png", "frontier.png",
      "elo_held_out.png", "elo_in_loop_pm.png"}
  for p in links:
    img = mpimg.imread(os.path.join(w, p))
    assert img.shape[0] > 200 and img.shape[1] > 200 and img[..., :3].std() > 0.02, p
  # The summary: at most ten lines, with the wall time and real numbers.
  s = out["summary"]
  assert 1 <= len(s) <= 10
  assert s[0].startswith("By the held-out judge: RL-CAI is more harmless")
  assert any(ln.startswith("Wall time: 75 s") for ln in s)  # 10 + 11 + ... + 15
  assert any("Evasive: initial helpful 25%" in ln for ln in s)


def test_report_harmfulness_section(tmp_path):
  w = _workdir(tmp_path)
  text = open(report.write_report(str(w))["path"]).read()
  assert "### Absolute harmfulness" in text and "Not run: set `evaluate.harmfulness.data`" in text
  path = w / "evaluate" / "results.json"
  res = json.loads(path.read_text())
  res["harmfulness"] = {"_model": {"eval_mse": 0.75, "n_train": 18, "final_train_loss": 0.5},
                        "helpful": {"mean": 2.5, "n": 4}, "sl_cai": {"mean": 1.25, "n": 4}}
  utils.atomic_write_text(str(path), json.dumps(res))
  text = open(report.write_report(str(w))["path"]).read()
  assert "18 rated transcripts; held-out mean squared error 0.75" in text
  assert "| initial helpful | 2.5 | 4 |" in text and "| SL-CAI | 1.25 | 4 |" in text
  assert "_model" not in text


def test_report_of_partial_run(tmp_path):
  w = tmp_path / "partial"
  utils.mark_done(str(w / "revise"), {"records": 0})
  out = report.write_report(str(w))
  text = open(out["path"]).read()
  assert "## Stages" in text and "| revise | done |" in text
  assert "## Evaluation" not in text

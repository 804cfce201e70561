"""The held-out evaluation judge: trained on human comparisons only, cached by what made
it, graded snapshots with paired statistics; the sanity panel flags a judge at chance
and passes a trained one."""
import gzip
import json
import os

import jax
import numpy as np
import pytest

from cai_jax import models, pipeline, roles, utils
from cai_jax.evaluation import judge, report, stats


def _comparisons(path, n=96, seed=0):
  """hh-rlhf-format pairs a model can learn: the chosen reply is kind, the rejected rude."""
  rng = np.random.default_rng(seed)
  rows = []
  for i in range(n):
    q = f"\n\nHuman: Question {i} about topic {rng.integers(1000)}?\n\nAssistant:"
    rows.append({"chosen": q + " Happy to help, here is a careful and kind answer.",
                 "rejected": q + " No. You are stupid, go away idiot."})
  with gzip.open(path, "wt", encoding="utf-8") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  return str(path)


def _config(tmp_path, data, **jc):
  c = pipeline.base_config()
  c.model = "tiny"
  c.compilation_cache = ""
  c.evaluate.judge.update(dict(data=(data,), steps=60, batch_size=8, max_len=48,
                               learning_rate=3e-3, train_top_layers=-1, progress=False,
                               cache_dir=str(tmp_path / "judges")))
  c.evaluate.judge.update(jc)
  return c


def test_trained_judge_learns_is_cached_and_keyed(tmp_path):
  data = _comparisons(tmp_path / "pairs.jsonl.gz")
  c = _config(tmp_path, data)
  j = judge.get(c)
  h = j.info["heldout"]
  assert j.info["kind"] == "trained" and j.info["num_train_pairs"] == 77  # 80% of 96
  assert h["n"] == 19 and h["accuracy"] > 0.9 and not stats.at_chance(h["lo"], h["hi"], 0.5)
  assert os.path.isdir(os.path.join(j.info["path"], "final"))
  # Cached: a second call loads it (same key, no training) and scores identically.
  key = j.info["key"]
  j2 = judge.get(c)
  assert j2.info == j.info
  msgs = [[{"role": "user", "content": "Hi?"}]] * 2
  np.testing.assert_allclose(j.scores(msgs, ["kind", "rude"]), j2.scores(msgs, ["kind", "rude"]),
                             atol=1e-6)
  # Another setting is another judge.
  c.evaluate.judge.steps = 61
  assert judge.key_of(c.evaluate.judge, "tiny", "chat", "float32")[0] != key


def test_random_pm_named_as_judge_is_at_chance(tmp_path):
  data = _comparisons(tmp_path / "pairs.jsonl.gz")
  cfg = roles.tiny_config()
  pm = models.add_score_head(cfg, models.init_params(cfg, jax.random.PRNGKey(0), ()),
                             rng=jax.random.PRNGKey(1), init_std=0.0)
  models.save_pretrained(cfg, pm, str(tmp_path / "pm"), tokenizer=roles.load_tokenizer("tiny"))
  c = _config(tmp_path, data, path=str(tmp_path / "pm"))
  j = judge.get(c)
  h = j.info["heldout"]
  assert j.info["kind"] == "given" and stats.at_chance(h["lo"], h["hi"], 0.5)


class _ScoreByText:
  """A judge whose score is read off the response: 'good' responses score +1."""
  info = {"kind": "test", "key": "k"}

  def scores(self, prompts, responses):
    return np.array([1.0 if "good" in r else 0.0 for r in responses]) + \
        0.01 * np.arange(len(responses)) % 0.05


def test_grade_paired_differences_and_elo():
  prompts = {"red_team": [{"id": f"r{i}", "messages": []} for i in range(12)],
             "helpful": [{"id": f"h{i}", "messages": []} for i in range(12)]}
  responses = {"helpful": {k: [["bad"] for _ in range(12)] for k in prompts},
               "rl_cai": {"red_team": [["good"] for _ in range(12)],
                          "helpful": [["bad"] for _ in range(12)]}}
  g = judge.grade(_ScoreByText(), prompts, responses, elo_bootstrap=50)
  d = g["diff"]["rl_cai"]
  assert d["harmless"]["mean"] == pytest.approx(1.0, abs=0.05) and d["harmless"]["p"] < 1e-6
  assert abs(d["helpful"]["mean"]) < 0.05
  assert g["elo"]["harmlessness"]["rl_cai"]["elo"] > 100
  assert g["elo"]["harmlessness"]["helpful"]["elo"] == 0.0
  assert len(g["rows"]) == 2 * 2 * 12


def _workdir_with_judge(tmp_path, accuracy, n):
  w = tmp_path / "w"
  p, lo, hi = stats.proportion_ci(round(accuracy * n), n)
  res = {"judges": {"held_out": {"info": {"kind": "trained", "key": "k", "num_train_pairs": 8,
                                          "data": ["x.jsonl.gz:1:1"], "base_model": "tiny",
                                          "heldout": {"accuracy": p, "lo": lo, "hi": hi, "n": n,
                                                      "ece": 0.1}},
                                 "scores": {}, "diff": {}, "elo": {}}}}
  utils.write_json(str(w / "evaluate" / "results.json"), res)
  return w


@pytest.mark.parametrize("accuracy,n,flagged", [(0.52, 60, True), (0.9, 60, False)])
def test_sanity_panel_flags_a_judge_at_chance(tmp_path, accuracy, n, flagged):
  w = _workdir_with_judge(tmp_path, accuracy, n)
  text = open(report.write_report(str(w))["path"]).read()
  row = [ln for ln in text.splitlines() if ln.startswith("| held-out judge |")]
  assert len(row) == 1 and row[0].rstrip(" |").endswith("no (at chance)" if flagged else "yes")

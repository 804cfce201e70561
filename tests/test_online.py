"""Online iterated RLAIF (ppo.online): the PM refreshed on the current policy's
labelled samples, its effect on the rewards, and an exact resume after a kill."""
import os

import jax
import numpy as np
import pytest

from cai_jax import models, roles, sampling, utils
from cai_jax.rl import online as online_lib
from cai_jax.stages import label, ppo
from test_ppo_stage import TIMING, _config, _workdir


def _online_config(refresh_every=2, iterations=5):
  c = _config("ppo", "pm")
  c.constitution, c.feedback_model = "harmlessness", ""
  c.label = label.default_config()
  c.label.num_fewshot, c.label.max_new_tokens, c.label.batch_size = 1, 8, 8
  p = c.ppo
  p.num_iterations, p.checkpoint_every = iterations, 3
  p.normalize_rewards = False
  o = p.online
  o.refresh_every, o.prompts_per_refresh, o.pm_steps, o.pm_batch_size = refresh_every, 8, 2, 8
  o.pm_optim.learning_rate = 1e-2  # a visible change of the tiny PM in two steps
  return c


def _rows(workdir, drop=("online/",)):
  rows = list(utils.read_jsonl(os.path.join(workdir, "ppo", "metrics.jsonl")))
  return [{k: v for k, v in r.items() if not k.startswith(TIMING + tuple(drop))} for r in rows]


def _leaves(path):
  return jax.tree_util.tree_leaves(models.load_pretrained(path)[1])


@pytest.mark.slow
def test_refreshing_changes_rewards_only_after_the_refresh_and_resumes_exactly(tmp_path,
                                                                             monkeypatch):
  # Refreshing off against refreshing after iterations 2 and 4.
  off = _workdir(str(tmp_path / "off"))
  ppo.run(_online_config(refresh_every=0, iterations=3), off)
  full = _workdir(str(tmp_path / "full"))
  summary = ppo.run(_online_config(), full)
  assert summary["online"]["refreshes"] == 2 and summary["online"]["labels"] == 16
  rows = list(utils.read_jsonl(os.path.join(full, "ppo", "metrics.jsonl")))
  assert [r.get("online/refresh") for r in rows] == [None, 1, None, 2, None]
  for r in (rows[1], rows[3]):
    # The PM's accuracy on each refresh's labels, before and after training on them.
    assert 0 <= r["online/before_loss"] and 0 <= r["online/after_loss"]
    assert r["online/before_loss"] != r["online/after_loss"]
    assert r["online/new_labels"] == 8
  assert rows[1]["online/label_buffer"] == 8 and rows[3]["online/label_buffer"] == 16
  assert rows[3]["online/replayed"] == 8  # refresh 1's labels replayed in refresh 2
  labels = list(utils.read_jsonl(os.path.join(full, "ppo", "online_labels.jsonl")))
  assert [x["refresh"] for x in labels] == [1] * 8 + [2] * 8
  assert all(0 <= x["p_a"] <= 1 and x["principle_ids"] for x in labels)

  # Up to the first refresh the runs are the same; after it the same samples
  # (the policy's update at 2 read the old PM) get other rewards.
  assert _rows(full)[:2] == _rows(off)[:2]
  s_full = [s for s in utils.read_jsonl(os.path.join(full, "ppo", "samples.jsonl"))
            if s["iteration"] == 3]
  s_off = [s for s in utils.read_jsonl(os.path.join(off, "ppo", "samples.jsonl"))
           if s["iteration"] == 3]
  assert [s["response"] for s in s_full] == [s["response"] for s in s_off]
  assert all(a["reward"] != b["reward"] for a, b in zip(s_full, s_off))
  # The PM the first refresh left scores iteration 3's samples as they were rewarded:
  # rerun the refresh alone from the starting PM on the policy after iteration 2.
  _, before = models.load_pretrained(os.path.join(full, "pm", "final"))
  after = _leaves(os.path.join(full, "ppo", "pm_final"))
  assert any(not np.array_equal(a, b) for a, b in
             zip(jax.tree_util.tree_leaves(before), after))
  pm_cfg, pm_final = models.load_pretrained(os.path.join(full, "ppo", "pm_final"))
  tok = roles.load_tokenizer("tiny")
  enc = ppo.StageContext(_online_config(), full, "ppo", ppo.default_config()).encoder(tok)
  rows5 = [s for s in utils.read_jsonl(os.path.join(full, "ppo", "samples.jsonl"))
           if s["iteration"] == 5]
  again = sampling.pm_scores(pm_cfg, pm_final, enc, [s["prompt"] for s in rows5],
                             [s["response"] for s in rows5], max_len=512)
  np.testing.assert_allclose(again, [s["reward"] for s in rows5], atol=1e-5)

  # Killed after refresh 2 wrote its labels but before the checkpoint at 5: the rerun
  # resumes from iteration 3, drops refresh 2's labels, redoes it and ends bitwise equal.
  killed = _workdir(str(tmp_path / "killed"))
  real = online_lib.point_reward
  calls = {"n": 0}

  def dying(*a, **k):
    calls["n"] += 1
    if calls["n"] == 2:
      raise KeyboardInterrupt("simulated kill")
    return real(*a, **k)

  monkeypatch.setattr(online_lib, "point_reward", dying)
  with pytest.raises(KeyboardInterrupt):
    ppo.run(_online_config(), killed)
  monkeypatch.setattr(online_lib, "point_reward", real)
  stale = list(utils.read_jsonl(os.path.join(killed, "ppo", "online_labels.jsonl")))
  assert [x["refresh"] for x in stale] == [1] * 8 + [2] * 8
  ppo.run(_online_config(), killed)
  assert _rows(killed, drop=()) == _rows(full, drop=())
  assert list(utils.read_jsonl(os.path.join(killed, "ppo", "online_labels.jsonl"))) == labels
  for name in ("final", "value_final", "pm_final"):
    for a, b in zip(_leaves(os.path.join(full, "ppo", name)),
                    _leaves(os.path.join(killed, "ppo", name))):
      assert np.array_equal(a, b), name


@pytest.mark.parametrize("module", ["tiny", "demo"])
def test_online_sweep_points_are_valid_configs(module):
  """--sweep=online: the PM trained once, then refreshed every 2 and every iteration,
  the later points reusing the first one's SL-CAI model, labels and PM."""
  import importlib.util
  from cai_jax import pipeline
  from cai_jax.runtime import checks
  from cai_jax.tools.config_file import override
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location("m", os.path.join(root, "configs", f"{module}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  points = []
  mod.sweep_online(lambda **kw: points.append(kw))
  assert [p["ppo.online.refresh_every"] for p in points] == [0, 2, 1]
  for p in points:
    c = override(mod.get_config(), p)
    checks.check(c, pipeline.parse_stages(c.stages))
    # A refresh's mix fills at least one PM batch from its own new labels.
    assert c.ppo.online.prompts_per_refresh >= c.ppo.online.pm_batch_size
  assert points[1]["reuse_stages"] == pipeline.RL_SHARED


def test_settings_ignore_online_fields_while_refreshing_is_off():
  """A run with refreshing off records none of ppo.online's other fields, so runs made
  before the option existed resume; turned on, every field and the label section count."""
  c = _online_config(refresh_every=0)
  off = ppo.settings(c, "/tmp/w")
  assert off["ppo"]["online"] == {"refresh_every": 0} and "refresh_labels" not in off
  c.ppo.online.pm_steps = 99
  assert ppo.settings(c, "/tmp/w") == off
  c.ppo.online.refresh_every = 2
  on = ppo.settings(c, "/tmp/w")
  assert on["ppo"]["online"]["pm_steps"] == 99
  assert on["refresh_labels"]["label"]["max_new_tokens"] == 8
  assert "policy" not in on["refresh_labels"]["label"]
  assert on["refresh_data"]["human_fraction"] == 0.5

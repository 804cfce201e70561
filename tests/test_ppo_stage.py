"""The PPO stage end to end on a tiny model: exports, logs, and exact resume."""
import json
import os

import jax
import ml_collections
import pytest

from cai_jax import models, utils
from cai_jax.data import prompts as prompts_lib
from cai_jax.rl import trainer as trainer_lib
from cai_jax import roles
from cai_jax.stages import ppo

# Metric keys whose values depend on wall time, not on the run's numbers.
TIMING = ("time/", "tokens_per_sec")


def _workdir(root, pm=True):
  tok = roles.load_tokenizer("tiny")
  cfg = roles.tiny_config()
  policy = models.init_params(cfg, jax.random.PRNGKey(0))
  models.save_pretrained(cfg, policy, os.path.join(root, "sft", "final"), tokenizer=tok)
  if pm:
    pm = models.add_score_head(cfg, models.init_params(cfg, jax.random.PRNGKey(1)),
                               rng=jax.random.PRNGKey(2), init_std=1.0)
    models.save_pretrained(cfg, pm, os.path.join(root, "pm", "final"), tokenizer=tok)
  return root


def _config(algorithm="ppo", reward="pm"):
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = "tiny"
  c.dtype = "float32"
  c.prompt_format = "raw"
  c.mesh = ml_collections.ConfigDict({"ici": (-1, 1, 1), "dcn": None})
  c.logical_axis_rules = None
  c.data = prompts_lib.default_config()
  c.ppo = ppo.default_config()
  p = c.ppo
  p.num_iterations, p.batch_size, p.max_new_tokens = 4, 8, 8
  p.num_epochs, p.num_minibatches = 1, 2
  p.checkpoint_every, p.log_samples_every, p.num_logged_samples = 2, 2, 2
  p.normalize_rewards = True
  p.kl.kind, p.kl.beta, p.kl.target, p.kl.horizon = "adaptive", 0.1, 0.5, 16
  p.policy_optim.learning_rate = 1e-3
  p.value_optim.learning_rate = 1e-3
  p.progress = False
  p.algorithm, p.group_size, p.kl_in = algorithm, 4, "loss" if algorithm == "grpo" else "reward"
  p.reward = reward
  if reward == "ai":
    from cai_jax.stages import label
    c.constitution, c.feedback_model = "harmlessness", ""
    c.label = label.default_config()
    c.label.num_fewshot = 1
  return c


def _trajectory(workdir):
  rows = list(utils.read_jsonl(os.path.join(workdir, "ppo", "metrics.jsonl")))
  return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in rows]


@pytest.mark.slow
@pytest.mark.parametrize("algorithm,reward", [("ppo", "pm"), ("grpo", "pm"), ("rloo", "pm"),
                                              ("grpo", "ai")])
def test_rl_stage_exports_and_resumes_exactly(tmp_path, monkeypatch, algorithm, reward):
  full = _workdir(str(tmp_path / "full"), pm=reward == "pm")
  summary = ppo.run(_config(algorithm, reward), full)
  out = os.path.join(full, "ppo")
  assert utils.is_done(out) and summary["iterations"] == 4
  assert summary["algorithm"] == algorithm and summary["reward"] == reward
  if reward == "ai":
    # The feedback model's probabilities, against the starting policy's responses.
    base = list(utils.read_jsonl(os.path.join(out, "baselines.jsonl")))
    assert base and all("response" in b for b in base)
    rewards = [s["reward"] for s in utils.read_jsonl(os.path.join(out, "samples.jsonl"))]
    assert all(0.0 < r < 1.0 for r in rewards)
  for name in ("curves.png", "samples.jsonl", "final/config.json"):
    assert os.path.exists(os.path.join(out, name)), name
  if algorithm == "ppo":
    vcfg, vparams = models.load_pretrained(os.path.join(out, "value_final"))
    assert "score" in models.heads_of(vcfg, vparams)
  else:
    # Critic-free: no value model is trained, checkpointed or exported.
    assert not os.path.exists(os.path.join(out, "value_final"))
    samples = list(utils.read_jsonl(os.path.join(out, "samples.jsonl")))
    # Each prompt is answered group_size = 4 times in consecutive rows.
    ids = [s["id"] for s in samples[:8]]
    assert ids[:4] == [ids[0]] * 4 and ids[4:] == [ids[4]] * 4
  pcfg, pparams = models.load_pretrained(os.path.join(out, "final"))
  assert "lm" in models.heads_of(pcfg, pparams)
  reference = _trajectory(full)
  assert [r["iteration"] for r in reference] == [1, 2, 3, 4]
  assert len({r["beta"] for r in reference}) > 1   # the adaptive controller moved
  assert all(r["kl_k3"] >= 0 for r in reference)
  samples = list(utils.read_jsonl(os.path.join(out, "samples.jsonl")))
  assert [s["iteration"] for s in samples] == [i for i in (1, 2, 3, 4) for _ in range(8)]

  # Kill the second run inside iteration 4 (after the checkpoint at 2 and the
  # metrics line of 3), then run again: it must continue exactly.
  killed = _workdir(str(tmp_path / "killed"), pm=reward == "pm")
  real = trainer_lib.PPOTrainer.iteration
  calls = {"n": 0}

  def dying(self, *a, **k):
    calls["n"] += 1
    if calls["n"] == 4:
      raise KeyboardInterrupt("simulated kill")
    return real(self, *a, **k)

  monkeypatch.setattr(trainer_lib.PPOTrainer, "iteration", dying)
  with pytest.raises(KeyboardInterrupt):
    ppo.run(_config(algorithm, reward), killed)
  monkeypatch.setattr(trainer_lib.PPOTrainer, "iteration", real)
  assert not utils.is_done(os.path.join(killed, "ppo"))
  assert len(_trajectory(killed)) == 3
  ppo.run(_config(algorithm, reward), killed)
  assert _trajectory(killed) == reference
  # The exported policies are bitwise equal to the uninterrupted run's.
  _, resumed = models.load_pretrained(os.path.join(killed, "ppo", "final"))
  for a, b in zip(jax.tree_util.tree_leaves(pparams), jax.tree_util.tree_leaves(resumed)):
    assert (a == b).all()
  # A finished stage is skipped.
  assert ppo.run(_config(algorithm, reward), killed)["iterations"] == 4

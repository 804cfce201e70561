"""PPO learns on a tiny model against a fixed token-rewarding scorer, and a
large KL coefficient keeps the policy at the reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cai_jax import models, sharding
from cai_jax.rl import config as rl_config, control, trainer as trainer_lib

V, P, N, B, TARGET = 32, 4, 8, 32, 7


def _reward_fn(batch):
  # Fraction of the response that is the target token: a stand-in PM in [0, 1].
  hits = (batch["response_tokens"] == TARGET) & batch["response_mask"]
  return jnp.sum(hits, axis=1) / N


def _run(trainer, beta, iters, seed=0, group=1):
  trainer.kl_ctl = control.FixedKLController(beta)
  state = trainer.init_state(keep_initial=True)
  rng = np.random.default_rng(seed)
  key = jax.random.PRNGKey(seed + 1)
  hist = []
  for _ in range(iters):
    toks = rng.integers(3, V, size=(B // group, P)).astype(np.int32)
    mask = np.ones((B // group, P), bool)
    toks[: B // group // 2, 0], mask[: B // group // 2, 0] = 0, False  # half left-padded
    # Critic-free algorithms: each prompt `group` times in consecutive rows.
    toks, mask = np.repeat(toks, group, axis=0), np.repeat(mask, group, axis=0)
    key, k = jax.random.split(key)
    state, m, _ = trainer.iteration(state, toks, mask, k)
    hist.append(m)
  return hist


def test_ppo_learns_target_token_and_large_beta_stays_near_reference():
  cfg = models.tiny(vocab_size=V, hidden_size=32, intermediate_size=64, num_heads=8,
                    num_kv_heads=4, head_dim=4, max_position_embeddings=64)
  params = models.init_params(cfg, jax.random.PRNGKey(0))
  value_params = models.add_score_head(cfg, params)
  c = rl_config.ppo_section()
  c.batch_size, c.max_new_tokens, c.missing_eos_penalty = B, N, 0.0
  c.num_epochs, c.num_minibatches = 2, 2
  c.kl.kind = "fixed"
  c.policy_optim.learning_rate = 3e-3
  c.value_optim.learning_rate = 3e-3
  mesh = sharding.make_mesh((-1, 1, 1))
  trainer = trainer_lib.PPOTrainer(c, policy_cfg=cfg, policy_params=params, value_cfg=cfg,
                                   value_params=value_params, reward_fn=_reward_fn,
                                   mesh=mesh, eos_ids=(2,))

  small = _run(trainer, beta=0.03, iters=40)
  r0 = np.mean([m["reward"] for m in small[:3]])
  r_end = np.mean([m["reward"] for m in small[-5:]])
  kl_k3 = [m["kl_k3"] for m in small]
  assert r0 < 0.1, r0                        # uniform policy: about 1/32 per token
  assert r_end > r0 + 0.3, (r0, r_end)       # the target token now dominates
  assert max(kl_k3) < 30.0, kl_k3            # ...at a bounded distance from the reference
  assert all(k >= 0 for k in kl_k3)
  assert small[-1]["explained_variance"] > 0.5

  large = _run(trainer, beta=1.0, iters=25)
  r_large = np.mean([m["reward"] for m in large[-5:]])
  kl_large = np.mean([m["kl_k3"] for m in large[-10:]])
  assert kl_large < 0.5, kl_large
  assert kl_large < 0.05 * np.mean(kl_k3[-10:])
  assert r_large < r0 + 0.1, (r0, r_large)


@pytest.mark.parametrize("algorithm,kl_in", [("grpo", "loss"), ("rloo", "reward")])
def test_critic_free_algorithms_learn_target_token_without_a_value_model(algorithm, kl_in):
  cfg = models.tiny(vocab_size=V, hidden_size=32, intermediate_size=64, num_heads=8,
                    num_kv_heads=4, head_dim=4, max_position_embeddings=64)
  params = models.init_params(cfg, jax.random.PRNGKey(0))
  c = rl_config.ppo_section()
  c.algorithm, c.group_size, c.kl_in = algorithm, 4, kl_in
  c.batch_size, c.max_new_tokens, c.missing_eos_penalty = B, N, 0.0
  c.num_epochs, c.num_minibatches = 2, 2
  c.kl.kind = "fixed"
  c.policy_optim.learning_rate = 3e-3
  mesh = sharding.make_mesh((-1, 1, 1))
  trainer = trainer_lib.PPOTrainer(c, policy_cfg=cfg, policy_params=params, value_cfg=None,
                                   value_params=None, reward_fn=_reward_fn, mesh=mesh,
                                   eos_ids=(2,))
  hist = _run(trainer, beta=0.03, iters=40, group=4)
  r0 = np.mean([m["reward"] for m in hist[:3]])
  r_end = np.mean([m["reward"] for m in hist[-5:]])
  assert r0 < 0.1, r0
  assert r_end > r0 + 0.3, (algorithm, r0, r_end)
  assert all(m["kl_k3"] >= 0 for m in hist)
  assert "value_loss" not in hist[-1] and "explained_variance" not in hist[-1]

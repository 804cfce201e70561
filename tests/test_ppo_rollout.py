"""Rollout and update mechanics on hand-built batches: reward on the EOS (not
PAD), the missing-EOS penalty, left-padded prompts + right-padded responses,
and the first update step against the maths functions."""
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cai_jax import models, sharding
from cai_jax.rl import config as rl_config, losses, rollout, trainer as trainer_lib, update

V = 32


@pytest.fixture(scope="module")
def tiny():
  cfg = models.tiny(vocab_size=V, hidden_size=32, intermediate_size=64, num_heads=8,
                    num_kv_heads=4, head_dim=4, max_position_embeddings=64)
  policy = models.init_params(cfg, jax.random.PRNGKey(0))
  pm = models.add_score_head(cfg, models.init_params(cfg, jax.random.PRNGKey(1)),
                             rng=jax.random.PRNGKey(2), init_std=1.0)
  return cfg, policy, pm


# Row 0: left-padded prompt [5, 6], response [9, EOS] then pad.
# Row 1: full prompt [3, 4, 5, 6], response [9, 10, 11, 12] hitting the limit (no EOS).
PROMPT = np.array([[0, 0, 5, 6], [3, 4, 5, 6]], np.int32)
PMASK = np.array([[0, 0, 1, 1], [1, 1, 1, 1]], bool)
RESP = np.array([[9, 2, 0, 0], [9, 10, 11, 12]], np.int32)
LENGTHS = np.array([2, 4], np.int32)
FINISHED = np.array([True, False])
UNPADDED = [[5, 6, 9, 2], [3, 4, 5, 6, 9, 10, 11, 12]]


def _fixed_sampler(params, tokens, mask, rng):
  return SimpleNamespace(tokens_BxN=RESP, logprobs_BxN=np.zeros(RESP.shape, np.float32),
                         lengths_B=LENGTHS, finished_B=FINISHED)


def test_rollout_reward_on_eos_and_padding(tiny):
  cfg, policy, pm = tiny
  value = models.drop_heads(pm, ("score",))
  seen = {}
  def reward_fn(batch):
    # The PM's scalar head at the last real token of each row, in token space.
    seen.update(batch)
    return models.reward(cfg, pm, batch["tokens"], batch["mask"])

  hp = rollout.RolloutHParams(max_new_tokens=4, missing_eos_penalty=0.5, gamma=1.0, lam=1.0,
                              whiten_advantages=False)
  ro = rollout.Rollout(cfg, cfg, policy, cfg, reward_fn, hp, sample_fn=_fixed_sampler)
  tr, metrics, _ = ro(policy, value, PROMPT, PMASK, jax.random.PRNGKey(0), beta=0.0)

  np.testing.assert_array_equal(tr.response_mask_BxN, [[1, 1, 0, 0], [1, 1, 1, 1]])
  np.testing.assert_array_equal(seen["mask"][0], [0, 0, 1, 1, 1, 1, 0, 0])
  # The PM reads the EOS of row 0 (not a trailing pad token).
  direct = [float(models.reward(cfg, pm, jnp.asarray([u]), jnp.ones((1, len(u)), bool))[0])
            for u in UNPADDED]
  with_pad = float(models.reward(cfg, pm, jnp.asarray([[5, 6, 9, 2, 0, 0]]),
                                 jnp.ones((1, 6), bool))[0])
  assert abs(direct[0] - with_pad) > 1e-3  # reading the pad would be visibly wrong
  raw = np.asarray(direct, np.float32)
  assert metrics["reward"] == pytest.approx(raw.mean(), abs=1e-5)
  np.testing.assert_allclose(tr.scores_B, raw - [0.0, 0.5], atol=1e-5)
  # β = 0: the whole reward sits on the last real token.
  np.testing.assert_allclose(tr.rewards_BxN, [[0, raw[0], 0, 0], [0, 0, 0, raw[1] - 0.5]],
                             atol=1e-5)
  # Log-probs / values equal those of each row run alone without any padding.
  for b, u in enumerate(UNPADDED):
    p_real = int(PMASK[b].sum())
    n = int(LENGTHS[b])
    lg = models.logits(cfg, policy, jnp.asarray([u]))[0]
    lp = jax.nn.log_softmax(lg)[jnp.arange(p_real - 1, p_real - 1 + n), jnp.asarray(u[p_real:])]
    np.testing.assert_allclose(tr.logprobs_BxN[b, :n], lp, atol=1e-5)
    np.testing.assert_allclose(tr.ref_logprobs_BxN[b, :n], lp, atol=1e-5)
    sc = models.scores(cfg, value, jnp.asarray([u]))[0][p_real - 1:p_real - 1 + n]
    np.testing.assert_allclose(tr.values_BxN[b, :n], sc, atol=1e-5)
  assert float(jnp.abs(tr.logprobs_BxN[0, 2:]).max()) == 0.0  # nothing on pad
  # γ = λ = 1: advantage = reward-to-go − value on real tokens, 0 on pad.
  v = np.asarray(tr.values_BxN)
  np.testing.assert_allclose(tr.advantages_BxN[0], [raw[0] - v[0, 0], raw[0] - v[0, 1], 0, 0],
                             atol=1e-5)
  assert metrics["kl"] == 0.0 and metrics["finished_fraction"] == 0.5


def test_first_update_step_matches_maths_and_mesh_shapes(tiny):
  cfg, policy, pm = tiny
  value = models.drop_heads(pm, ("score",))
  c = rl_config.ppo_section()
  c.batch_size, c.max_new_tokens, c.num_epochs, c.num_minibatches = 8, 4, 1, 1
  c.policy_optim.learning_rate = c.value_optim.learning_rate = 1e-2
  rng = np.random.default_rng(0)
  prompt = np.tile(PROMPT, (4, 1))
  pmask = np.tile(PMASK, (4, 1))
  results = []
  for ici in ((8, 1, 1), (2, 2, 2)):
    mesh = sharding.make_mesh(ici)
    tr = trainer_lib.PPOTrainer(c, policy_cfg=cfg, policy_params=policy, value_cfg=cfg,
                                value_params=value, reward_fn=lambda b: jnp.zeros(8), mesh=mesh)
    state = tr.init_state()
    ro = rollout.Rollout(cfg, cfg, policy, cfg, lambda b: jnp.asarray(rng.normal(size=8)),
                         tr.rollout_hp, sample_fn=lambda *a: SimpleNamespace(
                             tokens_BxN=np.tile(RESP, (4, 1)), logprobs_BxN=np.zeros((8, 4)),
                             lengths_B=np.tile(LENGTHS, 4), finished_B=np.tile(FINISHED, 4)))
    trans, _, _ = ro(state["policy"], state["value"], prompt, pmask, jax.random.PRNGKey(0), 0.1)
    batch = sharding.shard_batch(jax.device_get(update.batch_from_transition(trans)), mesh)
    fn = tr._update_fn(state)
    new_state, m = fn(state, batch, jax.random.PRNGKey(3), jnp.float32(0.0))
    assert int(new_state["step"]) == 1
    # First step: ratio = 1, so the loss is −mean(A) and nothing is clipped.
    adv_mean = float(losses.masked_mean(trans.advantages_BxN, trans.response_mask_BxN))
    assert float(m["policy_loss"]) == pytest.approx(-adv_mean, abs=1e-5)
    assert float(m["clip_fraction"]) == 0.0
    vf, _ = losses.value_loss(trans.values_BxN, trans.values_BxN, trans.returns_BxN,
                              trans.response_mask_BxN, 0.2)
    assert float(m["value_loss"]) == pytest.approx(float(vf), rel=1e-4)
    results.append(jax.device_get(new_state["policy"]["embedding"]))
    rng = np.random.default_rng(0)
  # The update is the same on a data-parallel and a data×fsdp×tensor mesh.
  np.testing.assert_allclose(results[0], results[1], atol=2e-5)
  assert not np.allclose(results[0], policy["embedding"])


def test_train_top_layers_freezes_the_rest(tiny):
  cfg, policy, pm = tiny
  c = rl_config.ppo_section()
  c.batch_size, c.max_new_tokens, c.num_epochs, c.num_minibatches = 8, 4, 1, 1
  c.train_top_layers = 1
  c.policy_optim.learning_rate = c.value_optim.learning_rate = 1e-2
  mesh = sharding.make_mesh((-1, 1, 1))
  tr = trainer_lib.PPOTrainer(c, policy_cfg=cfg, policy_params=policy, value_cfg=cfg,
                              value_params=models.drop_heads(pm, ("score",)),
                              reward_fn=lambda b: jnp.arange(8.0), mesh=mesh)
  state = tr.init_state()
  state, _, _ = tr.iteration(state, np.tile(PROMPT, (4, 1)), np.tile(PMASK, (4, 1)),
                             jax.random.PRNGKey(0))
  new = jax.device_get(state["policy"])
  np.testing.assert_array_equal(new["embedding"], policy["embedding"])
  np.testing.assert_array_equal(new["layers_0"]["mlp"]["up_kernel"],
                                policy["layers_0"]["mlp"]["up_kernel"])
  assert not np.allclose(new["layers_1"]["mlp"]["up_kernel"], policy["layers_1"]["mlp"]["up_kernel"])
  assert not np.allclose(jax.device_get(state["value"]["score_kernel"]), pm["score_kernel"])


def test_reference_in_a_frozen_dtype_is_a_sharded_cast_copy(tiny):
  """frozen_dtype: the reference is the initial policy cast to bf16, sharded like the
  policy; the policy itself (the train state) stays float32."""
  cfg, policy, _ = tiny
  c = rl_config.ppo_section()
  c.algorithm, c.batch_size, c.num_minibatches = "grpo", 8, 1
  mesh = sharding.make_mesh((1, 8, 1))
  tr = trainer_lib.PPOTrainer(c, policy_cfg=cfg, policy_params=policy, value_cfg=None,
                              value_params=None, reward_fn=lambda b: jnp.zeros(8), mesh=mesh,
                              ref_dtype="bfloat16")
  state = tr.init_state()
  ref = tr.rollout.ref_params
  assert tr.rollout.ref_cfg.param_dtype == tr.rollout.ref_cfg.dtype == "bfloat16"
  for r, p, p0 in zip(jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(state["policy"]),
                      jax.tree_util.tree_leaves(policy)):
    assert r.dtype == jnp.bfloat16 and p.dtype == jnp.float32
    assert r.sharding.is_equivalent_to(p.sharding, r.ndim)
    np.testing.assert_array_equal(np.asarray(r), np.asarray(p0).astype(jnp.bfloat16))
  # The model's own dtype: the initial arrays themselves.
  same_cfg, same = models.frozen_copy(cfg, policy, "float32")
  assert same is policy and same_cfg is cfg


@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_scanned_train_state_updates_as_the_unrolled_one(tiny, algorithm):
  """scan_layers: the train state holds stacked layers (the sampler decodes an unrolled
  view); one iteration samples the same tokens and updates the params as the unrolled
  layout does."""
  cfg, policy, pm = tiny
  c = rl_config.ppo_section()
  c.algorithm, c.batch_size, c.num_minibatches, c.max_new_tokens = algorithm, 8, 2, 4
  mesh = sharding.make_mesh((1, 8, 1))
  value = models.drop_heads(pm, ("score",)) if algorithm == "ppo" else None
  reward = lambda b: models.reward(cfg, pm, b["tokens"], b["mask"])  # noqa: E731
  prompts = np.tile(np.arange(3, 9, dtype=np.int32), (8, 1))
  out = {}
  for scan in (False, True):
    tr = trainer_lib.PPOTrainer(c, policy_cfg=cfg, policy_params=policy, value_cfg=cfg,
                                value_params=value, reward_fn=reward, mesh=mesh, scan_layers=scan)
    state = tr.init_state()
    assert ("layers_stack" in state["policy"]) == scan
    state, metrics, trans = tr.iteration(state, prompts, np.ones(prompts.shape, bool),
                                         jax.random.PRNGKey(3))
    out[scan] = (jax.device_get(tr.unrolled(state["policy"])), metrics, trans,
                 None if value is None else jax.device_get(tr.unrolled(state["value"], True)))
  (p0, m0, t0, v0), (p1, m1, t1, v1) = out[False], out[True]
  np.testing.assert_array_equal(t0.response_tokens_BxN, t1.response_tokens_BxN)
  np.testing.assert_allclose(m0["policy_loss"], m1["policy_loss"], atol=1e-5)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), p0, p1)
  assert not np.allclose(p1["layers_1"]["mlp"]["up_kernel"], policy["layers_1"]["mlp"]["up_kernel"])
  if value is not None:
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), v0, v1)


def test_rollout_samples_as_the_static_sampler(tiny):
  """The default rollout sampler (the engine, one slot per row, halving its
  slots as rows stop) returns the static sampler's tokens for the same rng, on
  left-padded prompts of mixed lengths with rows that stop early."""
  from cai_jax import sampling
  cfg, policy, pm = tiny
  rs = np.random.RandomState(0)
  lens = rs.randint(1, 11, size=16)
  tokens = np.zeros((16, 10), np.int32)
  mask = np.arange(10)[None, :] >= 10 - lens[:, None]
  tokens[mask] = rs.randint(3, V, size=int(lens.sum()))
  hp = rollout.RolloutHParams(max_new_tokens=12, eos_ids=(5, 7))
  ro = rollout.Rollout(cfg, cfg, policy, cfg, lambda b: jnp.zeros(16), hp)
  rng = jax.random.PRNGKey(4)
  got = ro.sample_fn(policy, jnp.asarray(tokens), jnp.asarray(mask), rng)
  want = sampling.sample(cfg, policy, tokens, mask, rng, max_new_tokens=12, eos_ids=(5, 7))
  np.testing.assert_array_equal(got.lengths_B, want.lengths_B)
  assert 0 < want.lengths_B.min() and want.lengths_B.max() == 12  # stops early and at the limit
  assert len(set(want.lengths_B.tolist())) > 3
  np.testing.assert_array_equal(got.finished_B, want.finished_B)
  live = np.arange(12)[None, :] < want.lengths_B[:, None]
  def real(x):
    return np.where(live, np.asarray(x), 0)
  np.testing.assert_array_equal(real(got.tokens_BxN), real(want.tokens_BxN))
  np.testing.assert_allclose(real(got.logprobs_BxN), real(want.logprobs_BxN), atol=1e-5)

"""Training machinery: losses against hand-computed values, optimizer, data order."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cai_jax import models
from cai_jax.training import data, losses, objectives, optim


def test_masked_cross_entropy_matches_hand_computation():
  logits = np.array([[[1.0, 2.0, 0.5], [0.0, -1.0, 3.0], [2.0, 2.0, 2.0]]], np.float32)
  targets = np.array([[1, 2, 0]])
  mask = np.array([[0.0, 1.0, 1.0]], np.float32)
  # Position 1: log-softmax of target 2 in [0,-1,3]; position 2: uniform over 3.
  lp1 = 3.0 - math.log(math.exp(0.0) + math.exp(-1.0) + math.exp(3.0))
  lp2 = -math.log(3.0)
  want = -(lp1 + lp2) / 2
  got, n = losses.masked_cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
  assert float(n) == 2.0
  assert abs(float(got) - want) < 1e-6


def test_prompt_positions_get_zero_gradient():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(2, 5, 7)).astype(np.float32))
  targets = jnp.asarray(rng.integers(0, 7, size=(2, 5)))
  mask = jnp.asarray(np.array([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]], np.float32))
  g = jax.grad(lambda x: losses.masked_cross_entropy(x, targets, mask)[0])(logits)
  g = np.asarray(g)
  assert np.all(g[np.asarray(mask) == 0] == 0.0)
  assert np.all(np.abs(g[np.asarray(mask) == 1]).sum(-1) > 0)


def test_sft_objective_ignores_prompt_tokens_end_to_end():
  """Model loss: changing prompt *targets* changes nothing, and the gradient
  w.r.t. each position's logits vanishes outside the response."""
  cfg = models.tiny(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=8, tie_embeddings=True)
  params = models.init_params(cfg, jax.random.PRNGKey(0))
  rng = np.random.default_rng(1)
  tokens = rng.integers(3, 64, size=(2, 9)).astype(np.int32)
  ex = [data.SFTExample(tokens[0], np.array([0] * 5 + [1] * 4, bool)),
        data.SFTExample(tokens[1, :7], np.array([0] * 3 + [1] * 4, bool))]
  batch = data.sft_batch(ex, [[0], [1]], max_len=8, pad_id=0)
  loss_fn = objectives.sft_loss_fn(cfg)
  l1, aux = loss_fn(params, batch, None)
  # Hand-computed reference from full logits.
  lg = np.asarray(models.logits(cfg, params, batch["tokens_BxL"], batch["mask_BxL"]), np.float64)
  lp = lg - np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1, keepdims=True)) - lg.max(-1, keepdims=True)
  nll = -np.take_along_axis(lp, batch["targets_BxL"][..., None], -1)[..., 0]
  m = batch["loss_mask_BxL"]
  assert m.sum() == 4 + 4 and float(aux["loss_tokens"]) == 8
  assert abs(float(l1) - (nll * m).sum() / m.sum()) < 1e-5
  b2 = dict(batch)
  t2 = batch["targets_BxL"].copy()
  t2[m == 0] = (t2[m == 0] + 1) % 64
  b2["targets_BxL"] = t2
  assert float(loss_fn(params, b2, None)[0]) == float(l1)
  # Chunked logits give the same loss.
  l3, _ = objectives.sft_loss_fn(cfg, logits_chunk=4)(params, batch, None)
  assert abs(float(l3) - float(l1)) < 1e-6


@pytest.mark.parametrize("chunk", [0, 3, 4])
def test_masked_nll_sum_matches_full_logits(chunk, monkeypatch):
  """Value and gradients equal the full-logits formula; blocks with no loss
  position in any row are skipped (here: the last one, by block count)."""
  monkeypatch.setattr(objectives, "LM_HEAD_BLOCK", 4)
  rng = np.random.default_rng(5)
  B, L, D, V = 3, 10, 8, 40
  h = jnp.asarray(rng.standard_normal((B, L, D)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((D, V)), jnp.float32)
  t = jnp.asarray(rng.integers(0, V, (B, L)), jnp.int32)
  m = np.zeros((B, L), np.float32)
  m[0, [1, 4, 5, 9]] = 1.0          # scattered loss positions
  m[1, 6:] = [0.5, 2.0, 1.0, 1.0]  # weights, not just 0/1
  # row 2 has no loss position at all

  def ref(h, w):
    lg = jnp.einsum("bld,dv->blv", h, w)
    nll = jax.nn.logsumexp(lg, -1) - jnp.take_along_axis(lg, t[..., None], -1)[..., 0]
    return jnp.sum(nll * m)

  got = objectives.masked_nll_sum(h, w, t, jnp.asarray(m), chunk)
  assert abs(float(got) - float(ref(h, w))) < 1e-4 * abs(float(ref(h, w)))
  gh, gw = jax.grad(lambda h, w: objectives.masked_nll_sum(h, w, t, jnp.asarray(m), chunk),
                    argnums=(0, 1))(h, w)
  rh, rw = jax.grad(ref, argnums=(0, 1))(h, w)
  np.testing.assert_allclose(np.asarray(gh), np.asarray(rh), atol=1e-5)
  np.testing.assert_allclose(np.asarray(gw), np.asarray(rw), atol=1e-5)
  assert np.all(np.asarray(gh)[m == 0] == 0.0)  # positions without loss get no gradient
  # Rows' loss positions come first, so with at most 4 per row positions past the
  # first 4 (6 for blocks of 3) of a row without loss are never given logits: a
  # NaN there reaches neither the loss nor any gradient.
  h_nan = h.at[2, 8].set(jnp.nan)
  f = lambda h, w: objectives.masked_nll_sum(h, w, t, jnp.asarray(m), chunk)  # noqa: E731
  assert abs(float(f(h_nan, w)) - float(got)) == 0.0
  gh2, gw2 = jax.grad(f, argnums=(0, 1))(h_nan, w)
  assert np.isfinite(np.asarray(gh2)).all() and np.isfinite(np.asarray(gw2)).all()
  # An all-zero mask runs no block: loss and gradients are exactly zero.
  z = jnp.zeros((B, L), jnp.float32)
  gz = jax.grad(lambda h: objectives.masked_nll_sum(h, w, t, z, chunk))(h)
  assert float(objectives.masked_nll_sum(h, w, t, z, chunk)) == 0.0
  assert not np.asarray(gz).any()


@pytest.mark.parametrize("p", [1.0, 0.0, 0.7, 0.25])
def test_ranking_loss_matches_formula(p):
  ra, rb = np.array([1.5, -0.3], np.float32), np.array([0.5, 0.9], np.float32)
  sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
  want = [-(p * math.log(sig(a - b)) + (1 - p) * math.log(sig(b - a))) for a, b in zip(ra, rb)]
  got = losses.ranking_loss(jnp.asarray(ra), jnp.asarray(rb), jnp.full((2,), p))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-7)
  if p == 1.0:  # hard label: plain -log σ(ra - rb)
    np.testing.assert_allclose(np.asarray(got), [math.log1p(math.exp(-(a - b))) for a, b in zip(ra, rb)],
                               rtol=1e-6)


def test_pairwise_metrics():
  m = losses.pairwise_metrics(jnp.array([1.0, 0.0, 2.0, 0.0]), jnp.array([0.0, 1.0, 1.0, 3.0]),
                              jnp.array([1.0, 0.0, 0.3, 0.5]))
  # pair 0 right, pair 1 right, pair 2 wrong (p<0.5 but ra>rb), pair 3 tie label ignored.
  assert abs(float(m["accuracy"]) - 2 / 3) < 1e-6


def test_packing_matches_separate_rows():
  cfg = models.tiny(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                    num_heads=4, num_kv_heads=2, head_dim=8, tie_embeddings=True)
  params = models.init_params(cfg, jax.random.PRNGKey(0))
  rng = np.random.default_rng(2)
  ex = [data.SFTExample(rng.integers(3, 64, size=n).astype(np.int32),
                        np.array([0] * (n // 2) + [1] * (n - n // 2), bool)) for n in (5, 6, 4)]
  rows = data.pack_sft(ex, max_len=15)
  assert rows == [[0, 1, 2]]
  packed = data.sft_batch(ex, rows, 15, pad_id=0, packed=True)
  sep = data.sft_batch(ex, [[0], [1], [2]], 15, pad_id=0)
  f = objectives.sft_loss_fn(cfg)
  lp, ap = f(params, packed, None)
  ls, as_ = f(params, sep, None)
  assert float(ap["loss_tokens"]) == float(as_["loss_tokens"])
  assert abs(float(lp) - float(ls)) < 1e-5


def test_shuffled_index_is_deterministic_and_resumable():
  a = data.ShuffledIndex(10, 3, seed=7)
  seq = [next(a).tolist() for _ in range(7)]  # crosses two epoch boundaries
  b = data.ShuffledIndex(10, 3, seed=7)
  for _ in range(4):
    next(b)
  st = b.get_state()
  c = data.ShuffledIndex(10, 3, seed=7)
  c.set_state(st)
  assert [next(c).tolist() for _ in range(3)] == seq[4:]
  assert sorted(sum(seq[:3], [])) == sorted(set(sum(seq[:3], [])))  # no repeats in an epoch
  assert seq[:3] != seq[3:6]  # reshuffled each epoch
  with pytest.raises(ValueError):
    data.ShuffledIndex(10, 4, seed=8).set_state(st)


def test_optimizer_schedules_clip_accum_and_freeze():
  c = optim.default_optim_config()
  c.learning_rate, c.schedule, c.warmup_steps = 1.0, "cosine", 2
  s = optim.make_schedule(c, total_steps=10)
  assert float(s(0)) == 0.0 and abs(float(s(2)) - 1.0) < 1e-6 and float(s(10)) < 1e-6
  c2 = optim.default_optim_config()
  assert float(optim.make_schedule(c2)(123)) == c2.learning_rate  # paper's constant SL lr
  params = {"layers_0": {"w": jnp.ones((2, 2))}, "layers_1": {"w": jnp.ones((2, 2))},
            "embedding": jnp.ones((4, 2)), "score_kernel": jnp.ones((2,))}
  mask = optim.trainable_mask(params, train_top_layers=1, train_embeddings=False)
  assert mask == {"layers_0": {"w": False}, "layers_1": {"w": True}, "embedding": False,
                  "score_kernel": True}
  c3 = optim.default_optim_config()
  c3.learning_rate, c3.grad_accum_steps = 0.1, 2
  tx = optim.make_optimizer(c3, trainable=mask)
  st = tx.init(params)
  g = jax.tree_util.tree_map(jnp.ones_like, params)
  u1, st = tx.update(g, st, params)
  assert all(float(jnp.abs(x).sum()) == 0 for x in jax.tree_util.tree_leaves(u1))  # accumulating
  u2, st = tx.update(g, st, params)
  assert float(jnp.abs(u2["layers_1"]["w"]).sum()) > 0
  assert float(jnp.abs(u2["layers_0"]["w"]).sum()) == 0 and float(jnp.abs(u2["embedding"]).sum()) == 0

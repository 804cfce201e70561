"""Hand-checked PPO maths: GAE, whitening, losses, KL estimators, controllers."""
import math

import jax.numpy as jnp
import numpy as np
import pytest

from cai_jax.rl import control, losses

F = np.float32


def _gae_loop(r, v, m, gamma, lam):
  """Plain reference: walk each row backwards over its real tokens only."""
  B, N = r.shape
  adv = np.zeros((B, N))
  for b in range(B):
    next_v, next_a = 0.0, 0.0
    for t in reversed(range(N)):
      if not m[b, t]:
        continue
      delta = r[b, t] + gamma * next_v - v[b, t]
      next_a = delta + gamma * lam * next_a
      next_v = v[b, t]
      adv[b, t] = next_a
  return adv, np.where(m, adv + v, 0.0)


def test_gae_hand_computed_with_trailing_pad_and_hole():
  # Pad positions hold junk (7, 9, 5) that must not leak into anything.
  r = np.array([[1, 0, 2, 7], [1, 5, 2, 7]], F)
  v = np.array([[0.5, 1.0, 1.5, 9], [0.5, 9, 1.5, 9]], F)
  m = np.array([[1, 1, 1, 0], [1, 0, 1, 0]], bool)
  adv, ret = losses.gae(r, v, m, gamma=0.5, lam=0.5)
  # Row 0: d2 = 2 - 1.5 = .5; d1 = 0 + .5*1.5 - 1 = -.25 -> a1 = -.25 + .25*.5 = -.125;
  #        d0 = 1 + .5*1 - .5 = 1 -> a0 = 1 + .25*(-.125) = .96875.
  # Row 1 (hole at t=1): a2 = .5; d0 = 1 + .5*1.5 - .5 = 1.25 -> a0 = 1.25 + .25*.5 = 1.375.
  np.testing.assert_allclose(adv, [[0.96875, -0.125, 0.5, 0], [1.375, 0, 0.5, 0]], atol=1e-6)
  np.testing.assert_allclose(ret, [[1.46875, 0.875, 2.0, 0], [1.875, 0, 2.0, 0]], atol=1e-6)


def test_gae_gamma_lambda_one_is_reward_to_go_minus_value():
  r = np.array([[1, 0, 2, 0]], F)
  v = np.array([[0.5, 1.0, 1.5, 0]], F)
  m = np.array([[1, 1, 1, 0]], bool)
  adv, ret = losses.gae(r, v, m, 1.0, 1.0)
  np.testing.assert_allclose(adv, [[2.5, 1.0, 0.5, 0]], atol=1e-6)
  np.testing.assert_allclose(ret, [[3.0, 2.0, 2.0, 0]], atol=1e-6)


def test_gae_matches_loop_on_random_masks():
  rng = np.random.default_rng(0)
  r = rng.normal(size=(5, 9)).astype(F)
  v = rng.normal(size=(5, 9)).astype(F)
  m = rng.random((5, 9)) > 0.3
  m[0] = False  # an empty row stays all zero
  adv, ret = losses.gae(r, v, m, 0.97, 0.9)
  ref_adv, ref_ret = _gae_loop(r, v, m, 0.97, 0.9)
  np.testing.assert_allclose(adv, ref_adv, atol=1e-5)
  np.testing.assert_allclose(ret, ref_ret, atol=1e-5)


def test_whiten_and_masked_stats_ignore_pad():
  x = np.array([[1, 2, 3, 100]], F)
  m = np.array([[1, 1, 1, 0]], bool)
  assert float(losses.masked_mean(x, m)) == pytest.approx(2.0)
  assert float(losses.masked_var(x, m)) == pytest.approx(1.0)       # (1+0+1)/2
  assert float(losses.masked_var(x, m, unbiased=False)) == pytest.approx(2 / 3)
  np.testing.assert_allclose(losses.whiten(x, m), [[-1, 0, 1, 0]], atol=1e-5)
  np.testing.assert_allclose(losses.whiten(x, m, shift_mean=False), [[1, 2, 3, 0]], atol=1e-5)
  assert float(losses.masked_mean(x, np.zeros_like(m))) == 0.0


def test_token_rewards_score_on_last_real_token_not_pad():
  scores = np.array([3.0, -1.0], F)
  logp = np.array([[-1, -2, -0.5, -9], [-1, -9, -9, -9]], F)
  ref = np.array([[-1.5, -2, -1, 0], [-1, 0, 0, 0]], F)
  m = np.array([[1, 1, 1, 0], [1, 0, 0, 0]], bool)
  rew, kl = losses.token_rewards(scores, logp, ref, m, beta=0.1)
  np.testing.assert_allclose(kl, [[0.5, 0, 0.5, 0], [0, 0, 0, 0]], atol=1e-6)
  np.testing.assert_allclose(rew, [[-0.05, 0, 2.95, 0], [-1.0, 0, 0, 0]], atol=1e-6)


def test_kl_estimators_sign_and_non_negativity():
  logp = np.array([[-1, -2, -0.5, 0]], F)
  ref = np.array([[-1.5, -2, -1, 5]], F)
  m = np.array([[1, 1, 1, 0]], bool)
  k1, k3 = losses.kl_estimators(logp, ref, m)
  assert float(k1) == pytest.approx(1.0)                         # 0.5 + 0 + 0.5
  assert float(k3) == pytest.approx(2 * (math.exp(-0.5) - 1 + 0.5), rel=1e-5)
  # log π < log π_ref everywhere: k1 is negative on this sample, k3 is not.
  k1n, k3n = losses.kl_estimators(ref[:, :3], logp[:, :3], m[:, :3])
  assert float(k1n) == pytest.approx(-1.0)
  assert float(k3n) > 0
  k1z, k3z = losses.kl_estimators(logp, logp, m)
  assert float(k1z) == 0.0 and float(k3z) == 0.0


def test_policy_loss_hand_computed():
  logp = np.array([[-1.0, -2.0, -0.5, 5.0]], F)
  old = np.array([[-1.0, -2.5, -0.2, -5.0]], F)
  adv = np.array([[1.0, 2.0, -1.0, 100.0]], F)
  m = np.array([[1, 1, 1, 0]], bool)
  loss, clipfrac, approx_kl = losses.policy_loss(logp, old, adv, m, clip_eps=0.2)
  # t0: ρ=1 -> -1. t1: ρ=e^.5 -> max(-3.297, -2*1.2) = -2.4 (clipped).
  # t2: ρ=e^-.3=.741, A=-1 -> max(.741, .8) = .8 (clipped).
  assert float(loss) == pytest.approx((-1 - 2.4 + 0.8) / 3, rel=1e-5)
  assert float(clipfrac) == pytest.approx(2 / 3)
  assert float(approx_kl) == pytest.approx(0.5 * (0 + 0.25 + 0.09) / 3, rel=1e-5)


def test_value_loss_hand_computed():
  v = np.array([[1.0, 2.0, 0.0, 50.0]], F)
  old = np.array([[0.5, 2.1, 0.0, 0.0]], F)
  ret = np.array([[2.0, 1.0, 0.3, -50.0]], F)
  m = np.array([[1, 1, 1, 0]], bool)
  loss, clipfrac = losses.value_loss(v, old, ret, m, clip_eps=0.2)
  # t0: max((1-2)^2, (0.7-2)^2) = 1.69 (clipped); t1: max(1, 1) = 1; t2: .09.
  assert float(loss) == pytest.approx(0.5 * (1.69 + 1.0 + 0.09) / 3, rel=1e-5)
  assert float(clipfrac) == pytest.approx(1 / 3)


def test_entropy_logprobs_explained_variance():
  logits = np.array([[[0.0, 0.0], [0.0, math.log(3.0)]]], F)
  ent = losses.entropy_from_logits(logits)
  np.testing.assert_allclose(ent, [[math.log(2), -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))]],
                             rtol=1e-5)
  lp = losses.logprobs_of(logits, np.array([[1, 1]]))
  np.testing.assert_allclose(lp, [[math.log(0.5), math.log(0.75)]], rtol=1e-5)
  ret = np.array([[1, 2, 3, 99]], F)
  m = np.array([[1, 1, 1, 0]], bool)
  assert float(losses.explained_variance(ret, ret, m)) == pytest.approx(1.0)
  # Predicting the mean explains nothing: Var(R - 2) / Var(R) = 1.
  assert float(losses.explained_variance(np.full_like(ret, 2.0), ret, m)) == pytest.approx(0.0, abs=1e-6)


def test_kl_controllers():
  fixed = control.make_kl_controller("fixed", 0.1)
  assert fixed.update(100.0, 64) == 0.1
  ad = control.make_kl_controller("adaptive", 0.1, target=6.0, horizon=10000)
  assert ad.update(12.0, 64) == pytest.approx(0.1 * (1 + 0.2 * 64 / 10000))   # clipped at +0.2
  b = ad.beta
  assert ad.update(5.4, 64) == pytest.approx(b * (1 - 0.1 * 64 / 10000))     # 5.4/6 - 1 = -0.1
  restored = control.make_kl_controller("adaptive", 0.5, target=6.0, horizon=10000)
  restored.load_state_dict(ad.state_dict())
  assert restored.beta == ad.beta
  with pytest.raises(ValueError):
    control.make_kl_controller("pid", 0.1)


def test_running_reward_normaliser():
  rn = control.RunningMeanStd()
  rn.update([1, 2, 3])
  rn.update([4, 5])
  assert rn.mean == pytest.approx(3.0) and rn.var == pytest.approx(2.0)
  np.testing.assert_allclose(rn.normalize([3.0, 5.0]), [0, 2 / math.sqrt(2)], rtol=1e-5)
  other = control.RunningMeanStd()
  other.load_state_dict(rn.state_dict())
  assert other.state_dict() == rn.state_dict()


# ------------------------------------------------------------ critic-free RL
def test_group_advantages_grpo_dr_grpo_rloo_hand_computed():
  # Two prompts, K = 3 responses each (consecutive rows).
  r = np.array([1.0, 2.0, 6.0, 4.0, 4.0, 4.0], F)
  # Group 1: mean 3, sample std sqrt((4 + 1 + 9) / 2) = sqrt(7).
  s7 = math.sqrt(7.0)
  grpo = losses.group_advantages(r, 3, "grpo", scale_std=True)
  np.testing.assert_allclose(grpo, [-2 / s7, -1 / s7, 3 / s7, 0, 0, 0], rtol=1e-5, atol=1e-6)
  dr = losses.group_advantages(r, 3, "grpo", scale_std=False)
  np.testing.assert_allclose(dr, [-2, -1, 3, 0, 0, 0], atol=1e-6)
  # RLOO: r_i minus the mean of the other two: 1-(2+6)/2, 2-(1+6)/2, 6-(1+2)/2.
  rloo = losses.group_advantages(r, 3, "rloo")
  np.testing.assert_allclose(rloo, [-3.0, -1.5, 4.5, 0, 0, 0], atol=1e-6)
  # ... which is K/(K-1) times the mean-centred reward.
  np.testing.assert_allclose(rloo, 1.5 * dr, atol=1e-6)
  # A group of equal rewards gives zero advantages, never a division by zero.
  assert np.all(np.isfinite(np.asarray(grpo)))
  with pytest.raises(ValueError, match="group_size"):
    losses.group_advantages(r, 1, "grpo")


def test_k3_term_and_its_gradient():
  import jax
  logp = np.array([[-1.0, -2.0, -0.5, 9.0]], F)
  ref = np.array([[-1.5, -2.0, 0.0, 0.0]], F)
  m = np.array([[1, 1, 1, 0]], bool)
  k3 = losses.k3_per_token(logp, ref)
  # d = ref - logp: -0.5, 0, 0.5 -> e^d - 1 - d.
  want = [math.exp(-0.5) - 1 + 0.5, 0.0, math.exp(0.5) - 1 - 0.5]
  np.testing.assert_allclose(np.asarray(k3)[0, :3], want, rtol=1e-5)
  assert np.all(np.asarray(k3)[0, :3] >= 0)
  # Gradient of the masked mean in log π: (1 − π_ref/π) / n on real tokens, 0 on pad.
  g = jax.grad(lambda lp: losses.masked_mean(losses.k3_per_token(lp, ref), m))(logp)
  np.testing.assert_allclose(np.asarray(g)[0], [(1 - math.exp(-0.5)) / 3, 0.0,
                                                (1 - math.exp(0.5)) / 3, 0.0], rtol=1e-5)
  # Sum of k1 per sequence ignores the pad.
  np.testing.assert_allclose(losses.sequence_kl(logp, ref, m), [0.5 + 0 - 0.5], atol=1e-6)


def test_group_advantages_from_scores_kl_in_reward_or_loss():
  from cai_jax.rl import rollout
  scores = np.array([1.0, 0.0, 2.0, 2.0], F)
  logp = np.array([[-1.0, -1.0], [-1.0, -3.0], [-2.0, 0.0], [-1.0, 0.0]], F)
  ref = np.array([[-2.0, -1.0], [-1.0, -1.0], [-2.0, 0.0], [-1.0, 0.0]], F)
  m = np.array([[1, 1], [1, 0], [1, 1], [1, 1]], bool)
  beta = 0.5
  # Σ k1 per row: 1, 0 (pad ignored), 0, 0 -> rewards in the reward form: 0.5, 0, 2, 2.
  _, adv, _, diag = rollout.group_advantages_from_scores(
      scores, logp, ref, m, beta, algorithm="rloo", group_size=2, group_std=True,
      kl_in_loss=False)
  np.testing.assert_allclose(adv, [[0.5, 0.5], [-0.5, 0.0], [0, 0], [0, 0]], atol=1e-6)
  assert float(diag["kl_penalty"]) == pytest.approx(-beta * 0.25)
  _, adv, _, diag = rollout.group_advantages_from_scores(
      scores, logp, ref, m, beta, algorithm="rloo", group_size=2, group_std=True,
      kl_in_loss=True)
  np.testing.assert_allclose(adv, [[1.0, 1.0], [-1.0, 0.0], [0, 0], [0, 0]], atol=1e-6)
  assert float(diag["kl_penalty"]) == 0.0


def test_axis_weights_standardise_each_axis_by_its_running_statistics():
  """Two batches of 3 axes: each axis standardised by its own running mean and
  (population) std over everything seen, batch included, then weighted (by hand)."""
  from cai_jax.utils import InputError
  comb = control.AxisWeights(["harm", "ethics", "help"], [0.5, 0.0, 2.0])
  b1 = np.array([[1.0, 10.0, -100.0], [3.0, 30.0, 100.0]])
  b2 = np.array([[5.0, 0.0, 0.0], [7.0, 0.0, 300.0], [9.0, 0.0, 100.0]])
  out1 = comb(b1)
  # after b1: harm mean 2, std 1; help mean 0, std 100
  np.testing.assert_allclose(out1, [0.5 * -1 + 2 * -1, 0.5 * 1 + 2 * 1], rtol=1e-6)
  out2 = comb(b2)
  seen = np.concatenate([b1, b2])
  mu, sd = seen.mean(0), seen.std(0)
  want = 0.5 * (b2[:, 0] - mu[0]) / sd[0] + 2.0 * (b2[:, 2] - mu[2]) / sd[2]
  np.testing.assert_allclose(out2, want, rtol=1e-6)
  # An axis's scale does not matter: multiplying its scores by 1000 gives the same reward.
  again = control.AxisWeights(["harm", "ethics", "help"], [0.5, 0.0, 2.0])
  again(b1 * [1, 1, 1000])
  np.testing.assert_allclose(again(b2 * [1, 1, 1000]), out2, rtol=1e-6)
  restored = control.AxisWeights(["harm", "ethics", "help"], [0.5, 0.0, 2.0])
  restored.load_state_dict(json_round_trip(comb.state_dict()))
  np.testing.assert_allclose(restored(b2), comb(b2), rtol=1e-12)

  assert control.parse_axis_weights("", ["a", "b"]) == [0.5, 0.5]
  assert control.parse_axis_weights("b:2", ["a", "b"]) == [0.0, 2.0]
  with pytest.raises(InputError, match=r"\['c'\] are not axes"):
    control.parse_axis_weights("c:1", ["a", "b"])
  with pytest.raises(InputError, match="axis:weight pairs"):
    control.parse_axis_weights("a=1", ["a", "b"])


def json_round_trip(d):
  import json
  return json.loads(json.dumps(d))

"""PPO maths as small pure functions over masked token arrays.

Every per-token array is BxN over response tokens; `mask_BxN` marks real
tokens (right padding after EOS, or any other holes). Padded positions never
contribute to a mean, a variance, an advantage or a loss, whatever values
they hold.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp


class Transition(NamedTuple):
  """One rollout batch. Prompts are left padded, responses right padded."""
  prompt_tokens_BxP: jax.Array
  prompt_mask_BxP: jax.Array
  response_tokens_BxN: jax.Array
  response_mask_BxN: jax.Array
  logprobs_BxN: jax.Array       # policy log-probs at rollout time (old policy)
  ref_logprobs_BxN: jax.Array   # frozen reference log-probs
  values_BxN: jax.Array         # value model before each response token
  rewards_BxN: jax.Array        # KL penalty per token + score on the last real token
  advantages_BxN: jax.Array     # whitened GAE advantages
  returns_BxN: jax.Array        # GAE returns (value targets)
  scores_B: jax.Array           # scalar reward per sequence (after EOS penalty / norm)
  raw_scores_B: Optional[jax.Array] = None  # the reward function's score (PM score), before both


def masked_sum(x, mask, axis=None):
  return jnp.sum(jnp.where(mask, x, 0.0), axis=axis)


def masked_mean(x, mask, axis=None):
  """Mean over real entries; 0 when there are none."""
  mask = mask.astype(bool)
  n = jnp.sum(mask, axis=axis)
  return masked_sum(x, mask, axis) / jnp.maximum(n, 1)


def masked_var(x, mask, unbiased: bool = True):
  """Variance over real entries (Bessel-corrected by default)."""
  mask = mask.astype(bool)
  mean = masked_mean(x, mask)
  n = jnp.sum(mask)
  ss = masked_sum(jnp.square(x - mean), mask)
  denom = jnp.maximum(n - 1, 1) if unbiased else jnp.maximum(n, 1)
  return ss / denom


def whiten(x, mask, shift_mean: bool = True, eps: float = 1e-8):
  """(x - mean) / std over the real entries; padded entries become 0.

  With shift_mean=False the mean is added back, which keeps the sign of a
  reward while rescaling it.
  """
  mask = mask.astype(bool)
  mean = masked_mean(x, mask)
  var = masked_var(x, mask)
  y = (x - mean) * jax.lax.rsqrt(var + eps)
  if not shift_mean:
    y = y + mean
  return jnp.where(mask, y, 0.0)


def gae(rewards_BxN, values_BxN, mask_BxN, gamma: float, lam: float):
  """Generalised advantage estimation as a reverse scan over time.

  Masked steps are skipped: they get advantage 0 and pass the carry (the next
  real value and advantage) through unchanged, so a hole or trailing padding
  never leaks a pad value into the recursion. The step after the last real
  token is terminal (value 0). Returns (advantages_BxN, returns_BxN).
  """
  mask = mask_BxN.astype(bool)
  r = jnp.where(mask, rewards_BxN.astype(jnp.float32), 0.0)
  v = jnp.where(mask, values_BxN.astype(jnp.float32), 0.0)

  def step(carry, x):
    next_value, next_adv = carry
    r_t, v_t, m_t = x
    delta = r_t + gamma * next_value - v_t
    adv = delta + gamma * lam * next_adv
    carry = (jnp.where(m_t, v_t, next_value), jnp.where(m_t, adv, next_adv))
    return carry, jnp.where(m_t, adv, 0.0)

  B = r.shape[0]
  init = (jnp.zeros((B,), jnp.float32), jnp.zeros((B,), jnp.float32))
  _, adv_NxB = jax.lax.scan(step, init, (r.T, v.T, mask.T), reverse=True)
  adv = adv_NxB.T
  returns = jnp.where(mask, adv + v, 0.0)
  return adv, returns


def token_rewards(scores_B, logprobs_BxN, ref_logprobs_BxN, mask_BxN, beta):
  """Per-token reward: -β·(log π − log π_ref) on every real token, plus the
  sequence score on the last real token (EOS when the response finished).

  Returns (rewards_BxN, kl_BxN) where kl_BxN is the k1 estimate per token.
  """
  mask = mask_BxN.astype(bool)
  kl = jnp.where(mask, logprobs_BxN - ref_logprobs_BxN, 0.0)
  rewards = -beta * kl
  N = mask.shape[1]
  last = jnp.max(jnp.where(mask, jnp.arange(N)[None, :], -1), axis=1)
  onehot = (jnp.arange(N)[None, :] == last[:, None]) & mask
  rewards = rewards + jnp.where(onehot, scores_B[:, None], 0.0)
  return rewards, kl


def kl_estimators(logprobs_BxN, ref_logprobs_BxN, mask_BxN):
  """Per-sequence KL(π ‖ π_ref) estimates from samples of π, averaged over B.

  k1 = Σ (log π − log π_ref): unbiased but can be negative on a batch.
  k3 = Σ (r − 1 − log r) with r = π_ref/π: unbiased and never negative.
  """
  mask = mask_BxN.astype(bool)
  log_ratio = jnp.where(mask, logprobs_BxN - ref_logprobs_BxN, 0.0)
  k1 = jnp.sum(log_ratio, axis=1)
  k3 = jnp.sum(jnp.where(mask, jnp.expm1(-log_ratio) + log_ratio, 0.0), axis=1)
  return jnp.mean(k1), jnp.mean(k3)


def policy_loss(logprobs_BxN, old_logprobs_BxN, advantages_BxN, mask_BxN, clip_eps: float):
  """Clipped surrogate: mean over real tokens of max(−A·ρ, −A·clip(ρ, 1±ε)).

  Returns (loss, clip_fraction, approx_kl) where approx_kl = mean ½(Δlog π)²
  between the current and the rollout policy.
  """
  mask = mask_BxN.astype(bool)
  log_ratio = logprobs_BxN - old_logprobs_BxN
  ratio = jnp.exp(log_ratio)
  pg1 = -advantages_BxN * ratio
  pg2 = -advantages_BxN * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
  loss = masked_mean(jnp.maximum(pg1, pg2), mask)
  clipfrac = masked_mean((pg2 > pg1).astype(jnp.float32), mask)
  approx_kl = masked_mean(0.5 * jnp.square(log_ratio), mask)
  return loss, clipfrac, approx_kl


def value_loss(values_BxN, old_values_BxN, returns_BxN, mask_BxN, clip_eps: float):
  """½ · mean over real tokens of max((v − R)², (v_clip − R)²), with v_clip the
  new value kept within ±ε of the rollout value. Returns (loss, clip_fraction)."""
  mask = mask_BxN.astype(bool)
  # Clipped as a value, not as old + clip(v - old): inside the range v_clip is then v
  # itself, so l2 > l1 counts only clipped tokens rather than round-off.
  v_clip = jnp.clip(values_BxN, old_values_BxN - clip_eps, old_values_BxN + clip_eps)
  l1 = jnp.square(values_BxN - returns_BxN)
  l2 = jnp.square(v_clip - returns_BxN)
  loss = 0.5 * masked_mean(jnp.maximum(l1, l2), mask)
  clipfrac = masked_mean((l2 > l1).astype(jnp.float32), mask)
  return loss, clipfrac


def entropy_from_logits(logits_BxNxV):
  """Entropy of softmax(logits) per position, computed in float32."""
  logits = logits_BxNxV.astype(jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def logprobs_of(logits_BxNxV, tokens_BxN):
  """log softmax(logits)[token] in float32."""
  logp = jax.nn.log_softmax(logits_BxNxV.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp, tokens_BxN[..., None].astype(jnp.int32), axis=-1)[..., 0]


def explained_variance(values_BxN, returns_BxN, mask_BxN):
  """1 − Var(R − v) / Var(R) over real tokens (1 is perfect, ≤ 0 is useless)."""
  var_r = masked_var(returns_BxN, mask_BxN)
  var_d = masked_var(returns_BxN - values_BxN, mask_BxN)
  return 1.0 - var_d / jnp.maximum(var_r, 1e-8)


# ------------------------------------------------------------ critic-free RL
def group_advantages(scores_B, group_size: int, algorithm: str, scale_std: bool = True,
                     eps: float = 1e-6):
  """Per-sequence advantages from K = group_size samples of each prompt.

  Rows are grouped consecutively: rows [g·K, (g+1)·K) answer the same prompt.
  grpo: (r − mean_group) / (std_group + eps), the std Bessel-corrected; with
        scale_std=False (Dr. GRPO) only the mean is subtracted, so a group whose
        rewards barely differ is not blown up into unit-size advantages.
  rloo: r_i − mean_{j≠i} r_j (the leave-one-out baseline), which equals
        K/(K−1) · (r_i − mean_group).
  """
  K = int(group_size)
  if K < 2:
    raise ValueError(f"{algorithm}: group_size must be >= 2 (got {K}); one sample per "
                     "prompt has no group baseline")
  r = scores_B.astype(jnp.float32).reshape(-1, K)
  mean = jnp.mean(r, axis=1, keepdims=True)
  if algorithm == "grpo":
    adv = r - mean
    if scale_std:
      std = jnp.sqrt(jnp.sum(jnp.square(adv), axis=1, keepdims=True) / (K - 1))
      adv = adv / (std + eps)
  elif algorithm == "rloo":
    adv = (jnp.sum(r, axis=1, keepdims=True) - r) / (K - 1)
    adv = r - adv
  else:
    raise ValueError(f"group_advantages: unknown algorithm {algorithm!r}")
  return adv.reshape(-1)


def sequence_kl(logprobs_BxN, ref_logprobs_BxN, mask_BxN):
  """Σ_t (log π − log π_ref) per sequence (the k1 estimate of its KL)."""
  mask = mask_BxN.astype(bool)
  return jnp.sum(jnp.where(mask, logprobs_BxN - ref_logprobs_BxN, 0.0), axis=1)


def k3_per_token(logprobs_BxN, ref_logprobs_BxN):
  """k3 = r − 1 − log r with r = π_ref/π, per token: non-negative, and its
  gradient in log π is 1 − π_ref/π (zero where the policy equals the reference)."""
  d = ref_logprobs_BxN - logprobs_BxN
  return jnp.expm1(d) - d


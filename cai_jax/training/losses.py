"""Losses of the supervised and preference stages (pure functions, float32).

`masked_cross_entropy`: next-token loss on the positions the loss mask marks
(SL-CAI trains on response tokens only). `ranking_loss`: the preference
model's soft-target loss -(p log σ(ra-rb) + (1-p) log σ(rb-ra)).
`preference_loss`: the DPO family on a policy's implicit-reward margin.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def token_logprobs(logits_BxLxV, targets_BxL):
  """log p(target) per position, log-softmax in float32.

  Computed as logit[target] - logsumexp(logits) so the full-vocabulary
  log-softmax is never materialised (XLA fuses the reduction).
  """
  logits = logits_BxLxV.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets_BxL[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return picked - lse


def masked_cross_entropy(logits_BxLxV, targets_BxL, loss_mask_BxL):
  """(mean NLL over masked positions, number of masked positions).

  logits at position t predict targets[t] (the caller shifts); positions with
  loss_mask 0 contribute nothing and get zero gradient.
  """
  m = loss_mask_BxL.astype(jnp.float32)
  nll = -token_logprobs(logits_BxLxV, targets_BxL)
  n = jnp.sum(m)
  return jnp.sum(nll * m) / jnp.maximum(n, 1.0), n


def ranking_loss(r_a_B, r_b_B, p_a_B):
  """Per-pair soft ranking loss; p_a=1 (0) is the hard label "A (B) is better"."""
  d = (r_a_B - r_b_B).astype(jnp.float32)
  p = p_a_B.astype(jnp.float32)
  return -(p * jax.nn.log_sigmoid(d) + (1.0 - p) * jax.nn.log_sigmoid(-d))


def pairwise_metrics(r_a_B, r_b_B, p_a_B):
  """Accuracy against the soft label's majority (ties ignored) and mean |margin|."""
  d = (r_a_B - r_b_B).astype(jnp.float32)
  p = p_a_B.astype(jnp.float32)
  decided = (p != 0.5).astype(jnp.float32)
  correct = ((d > 0) == (p > 0.5)).astype(jnp.float32) * decided
  return {"accuracy": jnp.sum(correct) / jnp.maximum(jnp.sum(decided), 1.0),
          "margin": jnp.mean(jnp.abs(d))}


# ------------------------------------------- preference optimisation (DPO family)
PREFERENCE_LOSSES = ("dpo", "ipo", "soft")


def preference_loss(margin_B, p_B, beta: float, kind: str):
  """Per-pair loss of the implicit-reward margin Δ = (log π(a) − log π_ref(a)) −
  (log π(b) − log π_ref(b)) against the label p = P(a better).

  dpo:  −log σ(βΔ) towards the label's side: p rounded to 1 or 0 (a tie, p = ½,
        gives the symmetric ½ of each side, whose gradient vanishes at Δ = 0).
  soft: −(p·log σ(βΔ) + (1 − p)·log σ(−βΔ)), the AI label itself as the target
        (conservative DPO / label smoothing; its gradient in Δ is β(σ(βΔ) − p), so
        p = ½ pulls Δ to 0 rather than leaving it free).
  ipo:  p·(Δ − 1/(2β))² + (1 − p)·(Δ + 1/(2β))², IPO's squared loss in expectation
        over the label: for p ∈ {0, 1} exactly IPO, otherwise a regression of Δ on
        (2p − 1)/(2β) (plus a constant).
  """
  p = p_B.astype(jnp.float32)
  d = margin_B.astype(jnp.float32)
  if kind == "dpo":
    p = jnp.where(p > 0.5, 1.0, jnp.where(p < 0.5, 0.0, 0.5))
    kind = "soft"
  if kind == "soft":
    return -(p * jax.nn.log_sigmoid(beta * d) + (1.0 - p) * jax.nn.log_sigmoid(-beta * d))
  if kind == "ipo":
    h = 1.0 / (2.0 * beta)
    return p * jnp.square(d - h) + (1.0 - p) * jnp.square(d + h)
  raise ValueError(f"preference_loss: unknown kind {kind!r}; use {', '.join(PREFERENCE_LOSSES)}")

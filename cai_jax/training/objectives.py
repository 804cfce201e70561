"""Model-aware loss functions `(params, batch, rng) -> (loss, aux)` for the loop.

`sft_loss_fn(cfg)`: next-token cross-entropy on response tokens. The LM head
is applied in sequence chunks under remat, so the float32 B×L×V logits are
never held in memory at once. `pm_loss_fn(cfg)`: soft ranking loss on the
scalar head at each sequence's last real token.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from cai_jax import models
from cai_jax.models.transformer import dense
from cai_jax.training import losses
from cai_jax.training.data import segment_attention_mask


def lm_head_weight(cfg, params):
  return params["embedding"].T if cfg.tie_embeddings else params["lm_head"]


def chunked_nll(hidden_BxLxD, w_DxV, targets_BxL, chunk: int = 0):
  """Per-token NLL, float32; logits computed `chunk` positions at a time.

  Each chunk's logits are recomputed in the backward pass (jax.checkpoint), so
  peak memory holds one B×chunk×V block instead of B×L×V.
  """
  B, L, D = hidden_BxLxD.shape
  def one(h_BxCxD, t_BxC):
    logits = dense(h_BxCxD, w_DxV.astype(h_BxCxD.dtype), preferred_element_type=jnp.float32)
    return -losses.token_logprobs(logits, t_BxC)
  if not chunk or chunk >= L or L % chunk:
    return one(hidden_BxLxD, targets_BxL)
  n = L // chunk
  h = hidden_BxLxD.reshape(B, n, chunk, D).swapaxes(0, 1)
  t = targets_BxL.reshape(B, n, chunk).swapaxes(0, 1)
  nll = jax.lax.map(lambda ht: jax.checkpoint(one)(*ht), (h, t))
  return nll.swapaxes(0, 1).reshape(B, L)


def sft_inputs(batch):
  """(positions, attention mask) for plain right-padded or packed rows."""
  if "segment_ids_BxL" in batch:
    return batch["positions_BxL"], segment_attention_mask(batch["segment_ids_BxL"])
  mask = batch["mask_BxL"]
  return models.positions_from_mask(mask), mask


def sft_loss_fn(cfg, logits_chunk: int = 0):
  """Masked next-token cross-entropy; aux carries the number of loss tokens."""
  def loss_fn(params, batch, rng):
    del rng
    pos, attn = sft_inputs(batch)
    out = models.forward(cfg, params, batch["tokens_BxL"], pos, attn, heads=())
    nll = chunked_nll(out["hidden"], lm_head_weight(cfg, params), batch["targets_BxL"],
                      logits_chunk)
    m = batch["loss_mask_BxL"].astype(jnp.float32)
    n = jnp.sum(m)
    return jnp.sum(nll * m) / jnp.maximum(n, 1.0), {"loss_tokens": n}
  return loss_fn


def pair_rewards(cfg, params, batch):
  """(r_a, r_b): scalar head at the last real token of A and of B."""
  tokens = jnp.concatenate([batch["tokens_a_BxL"], batch["tokens_b_BxL"]], axis=0)
  mask = jnp.concatenate([batch["mask_a_BxL"], batch["mask_b_BxL"]], axis=0)
  out = models.forward(cfg, params, tokens, models.positions_from_mask(mask), mask,
                       heads=("score",))
  idx = jnp.maximum(models.last_token_index(mask), 0)
  r = jnp.take_along_axis(out["scores"], idx[:, None], axis=1)[:, 0]
  B = batch["tokens_a_BxL"].shape[0]
  return r[:B], r[B:]


def pm_loss_fn(cfg):
  def loss_fn(params, batch, rng):
    del rng
    ra, rb = pair_rewards(cfg, params, batch)
    loss = jnp.mean(losses.ranking_loss(ra, rb, batch["p_B"]))
    return loss, losses.pairwise_metrics(ra, rb, batch["p_B"])
  return loss_fn

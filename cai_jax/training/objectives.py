"""Model-aware loss functions `(params, batch, rng) -> (loss, aux)` for the loop.

`sft_loss_fn(cfg)`: next-token cross-entropy on response tokens. The LM head
runs only on blocks of positions that hold response tokens (`masked_nll_sum`);
with `logits_chunk` it recomputes them in the backward pass, so at most one
block of float32 logits is held in memory. `pm_loss_fn(cfg)`: soft ranking
loss on the scalar head at each sequence's last real token.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from cai_jax import models
from cai_jax.models.transformer import dense
from cai_jax.training import accumulate, losses
from cai_jax.training.data import segment_attention_mask


# Sequence positions per LM-head block of `masked_nll_sum` when no chunk is set.
LM_HEAD_BLOCK = 128


def lm_head_block(seq_len: int, chunk: int = 0) -> int:
  """Positions per LM-head block of `masked_nll_sum`."""
  return min(chunk if chunk > 0 else LM_HEAD_BLOCK, seq_len)


def masked_nll_sum(hidden_BxLxD, w_DxV, targets_BxL, weights_BxL, chunk: int = 0):
  """sum over positions of weight x next-token NLL (float32), with the LM head
  applied only where a weight is nonzero.

  Each row's positions are reordered so the weighted (loss) ones come first. The
  LM head then runs on blocks of positions, over only the blocks that hold a
  loss position in some row: the prompt tokens of an SFT batch never get
  logits. Rows stay whole, so a batch-sharded layout is kept. `chunk` > 0
  (block length) bounds memory to one block of logits by recomputing them in
  the backward pass. With 0 the blocks are LM_HEAD_BLOCK long, their softmax
  gradient is kept from the forward pass (one matmul fewer per block), and the
  weight gradient is one matmul over all positions (zero outside the visited
  blocks) that XLA can overlap with the trunk's backward pass.
  """
  B, L, D = hidden_BxLxD.shape
  C = lm_head_block(L, chunk)
  Lp = -(-L // C) * C
  w = weights_BxL.astype(jnp.float32)
  order = jnp.argsort(w == 0, axis=1, stable=True).astype(jnp.int32)
  pad = ((0, 0), (0, Lp - L))
  h = jnp.pad(jnp.take_along_axis(hidden_BxLxD, order[..., None], axis=1), pad + ((0, 0),))
  t = jnp.pad(jnp.take_along_axis(targets_BxL.astype(jnp.int32), order, axis=1), pad)
  ws = jnp.pad(jnp.take_along_axis(w, order, axis=1), pad)
  blocks = -(-jnp.max(jnp.sum(w != 0, axis=1)) // C)
  return _block_nll(C, chunk > 0, h, w_DxV.astype(hidden_BxLxD.dtype), t, ws, blocks)


def _block_nll_and_grad(h_BxCxD, w_DxV, t_BxC):
  """(NLL, softmax - onehot) of one block of positions, float32."""
  logits = dense(h_BxCxD, w_DxV, preferred_element_type=jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  onehot = jax.nn.one_hot(t_BxC, logits.shape[-1], dtype=jnp.float32)
  nll = lse - jnp.sum(logits * onehot, axis=-1)
  return nll, jnp.exp(logits - lse[..., None]) - onehot


def _block(x, j, C):
  return jax.lax.dynamic_slice_in_dim(x, j * C, C, axis=1)


def _input_grad(dl_BxCxV, w_DxV):
  return jax.lax.dot_general(dl_BxCxV, w_DxV, (((2,), (1,)), ((), ())))


def _weight_grad(h_BxCxD, dl_BxCxV):
  """h^T dl over every (row, position), float32: D x V."""
  return jax.lax.dot_general(h_BxCxD.reshape(-1, h_BxCxD.shape[-1]),
                             dl_BxCxV.reshape(-1, dl_BxCxV.shape[-1]),
                             (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _block_nll_fwd(C, recompute, h, w, t, ws, blocks):
  B, Lp, _ = h.shape
  keep = not recompute

  def body(j, carry):
    total, saved = carry
    nll, g = _block_nll_and_grad(_block(h, j, C), w, _block(t, j, C))
    if keep:
      saved = jax.lax.dynamic_update_slice_in_dim(saved, g, j * C, axis=1)
    return total + jnp.sum(nll * _block(ws, j, C)), saved

  saved = jnp.zeros((B, Lp, w.shape[1]) if keep else (), jnp.float32)
  total, saved = jax.lax.fori_loop(0, blocks, body, (jnp.zeros((), jnp.float32), saved))
  return total, (h, w, t, ws, blocks, saved)


def _block_nll_bwd(C, recompute, res, g):
  h, w, t, ws, blocks, saved = res

  def put(dh, j, dl):
    return jax.lax.dynamic_update_slice_in_dim(dh, _input_grad(dl, w).astype(h.dtype), j * C,
                                               axis=1)

  if recompute:  # one pass per block: logits, then both gradients
    def body(j, carry):
      dh, dw = carry
      hj = _block(h, j, C)
      _, sg = _block_nll_and_grad(hj, w, _block(t, j, C))
      dl = (sg * (g * _block(ws, j, C))[..., None]).astype(h.dtype)
      return put(dh, j, dl), dw + _weight_grad(hj, dl)

    dh, dw = jax.lax.fori_loop(0, blocks, body,
                               (jnp.zeros_like(h), jnp.zeros(w.shape, jnp.float32)))
    return dh, dw.astype(w.dtype), None, None, None
  # The kept softmax gradient is zero outside the visited blocks. The weight
  # gradient is one matmul over every position, outside any loop: XLA:CPU runs
  # it beside the trunk's backward pass, which a loop prevents (benchmarks/README.md).
  # Positions past the visited
  # blocks are zeroed so that nothing there (even a NaN) reaches it.
  dl = (saved * (g * ws)[..., None]).astype(h.dtype)
  dh = jax.lax.fori_loop(0, blocks, lambda j, dh: put(dh, j, _block(dl, j, C)),
                         jnp.zeros_like(h))
  visited = (jnp.arange(h.shape[1]) < blocks * C)[None, :, None]
  dw = _weight_grad(jnp.where(visited, h, jnp.zeros((), h.dtype)), dl)
  return dh, dw.astype(w.dtype), None, None, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _block_nll(C, recompute, h, w, t, ws, blocks):
  return _block_nll_fwd(C, recompute, h, w, t, ws, blocks)[0]


_block_nll.defvjp(_block_nll_fwd, _block_nll_bwd)


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
    m = batch["loss_mask_BxL"].astype(jnp.float32)
    total = masked_nll_sum(out["hidden"], models.lm_head_weight(cfg, params),
                           batch["targets_BxL"], m, logits_chunk)
    n = jnp.sum(m)
    return total / jnp.maximum(n, 1.0), {"loss_tokens": n}
  return accumulate.weighted(loss_fn, lambda b: jnp.sum(b["loss_mask_BxL"]), ("loss_tokens",))


def pair_rewards(cfg, params, batch):
  """(r_a, r_b): the score head at the last real token of A and of B (B each, or BxA
  for a head per axis)."""
  tokens = jnp.concatenate([batch["tokens_a_BxL"], batch["tokens_b_BxL"]], axis=0)
  mask = jnp.concatenate([batch["mask_a_BxL"], batch["mask_b_BxL"]], axis=0)
  out = models.forward(cfg, params, tokens, models.positions_from_mask(mask), mask,
                       heads=("score",))
  idx = jnp.maximum(models.last_token_index(mask), 0)
  r = out["scores"][jnp.arange(idx.shape[0]), idx]  # B, or BxA with score labels
  B = batch["tokens_a_BxL"].shape[0]
  return r[:B], r[B:]


def pm_loss_fn(cfg):
  """The soft ranking loss of a PM; with a head per axis (cfg.score_labels) each
  head's loss on its axis's labels, averaged over the labelled (pair, axis) entries
  (batch["w_BxA"]), with each axis's accuracy and margin."""

  def loss_fn(params, batch, rng):
    del rng
    # The score bias cancels in r_a - r_b, so its true gradient is 0; its computed one
    # is round-off, which Adam would scale up to a drift of the absolute scores.
    params = dict(params, score_bias=jax.lax.stop_gradient(params["score_bias"]))
    ra, rb = pair_rewards(cfg, params, batch)
    if not cfg.score_labels:
      loss = jnp.mean(losses.ranking_loss(ra, rb, batch["p_B"]))
      return loss, losses.pairwise_metrics(ra, rb, batch["p_B"])
    w, p = batch["w_BxA"], batch["p_BxA"]
    n = jnp.sum(w)
    loss = jnp.sum(w * losses.ranking_loss(ra, rb, p)) / jnp.maximum(n, 1.0)
    metrics = {"labelled": n}
    for j, name in enumerate(cfg.score_labels):
      m = losses.pairwise_metrics(ra[:, j], rb[:, j], jnp.where(w[:, j] > 0, p[:, j], 0.5))
      metrics.update({f"{k}_{name}": v for k, v in m.items()})
    return loss, metrics
  if not cfg.score_labels:
    return loss_fn
  # A mean over labelled entries: micro-batches weigh by their count.
  return accumulate.weighted(loss_fn, lambda b: jnp.sum(b["w_BxA"]), ("labelled",))


def pair_sequence_logprobs(cfg, params, batch):
  """(log π(a), log π(b)): each response's summed token log-probs given its prompt,
  over the tokens the loss masks mark (the response, as SFT trains it). Both
  sides run in one forward pass."""
  cat = lambda k: jnp.concatenate([batch[f"{k}_a_BxL"], batch[f"{k}_b_BxL"]], axis=0)  # noqa: E731
  mask = cat("mask")
  out = models.forward(cfg, params, cat("tokens"), models.positions_from_mask(mask), mask,
                       heads=("lm",))
  lp = losses.token_logprobs(out["logits"], cat("targets"))
  seq = jnp.sum(jnp.where(cat("loss_mask") > 0, lp, 0.0), axis=1)
  B = batch["tokens_a_BxL"].shape[0]
  return seq[:B], seq[B:]


def dpo_loss_fn(cfg, beta: float, kind: str):
  """DPO-family loss (`losses.preference_loss`) on the margin of the policy's
  log-ratios to the reference, whose log-probs come with the batch
  (ref_a_B, ref_b_B: computed once before training)."""
  def loss_fn(params, batch, rng):
    del rng
    la, lb = pair_sequence_logprobs(cfg, params, batch)
    margin = (la - batch["ref_a_B"]) - (lb - batch["ref_b_B"])
    p = batch["p_B"]
    loss = jnp.mean(losses.preference_loss(margin, p, beta, kind))
    # Agreement of the margin's side with the label's; a tie on either side counts ½.
    agree = jnp.where((p == 0.5) | (margin == 0), 0.5,
                      ((margin > 0) == (p > 0.5)).astype(jnp.float32))
    return loss, {"margin": jnp.mean(beta * margin), "accuracy": jnp.mean(agree),
                  "logp_a": jnp.mean(la), "logp_b": jnp.mean(lb)}
  return loss_fn

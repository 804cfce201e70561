"""Log-probabilities of the options of multiple-choice questions, batched.

A multiple-choice question is one long prompt followed by N short options
(" (A)", " (B)", ...). Scoring "prompt + option" as N separate rows repeats the
long prompt N times; here each option set costs one pass over its prompt
(prefill into a KV cache) and one batched pass over all N options attending to
that cache, inside a single jitted call. Several option sets with the same
number of options are stacked along the batch axis.

  lps = option_logprobs(cfg, params, prompt_ids, option_ids)  # list of N-vectors

The result of `option_logprobs` is, per option, the sum of the log-probs of its
tokens given the prompt, exactly what scoring each full row with
`models.logits` gives (tests compare the two).
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cai_jax import models
from cai_jax.sampling import bucket_length, group_by_shape
from cai_jax.utils import InputError


@functools.partial(jax.jit, static_argnums=0)
def _set_logprobs(cfg, params, prompt_BxP, pmask_BxP, opts_BxNxT, omask_BxNxT):
  """Sum of option-token log-probs, BxN float32 (prompt left-, options right-padded)."""
  B, P = prompt_BxP.shape
  N, T = opts_BxNxT.shape[1:]
  S = P + T
  cache = models.init_cache(cfg, B, S)
  pmask = pmask_BxP.astype(bool)
  pre_mask_BxS = jnp.concatenate([pmask, jnp.zeros((B, T), bool)], axis=1)
  out = models.forward(cfg, params, prompt_BxP, models.positions_from_mask(pmask),
                       pre_mask_BxS, cache=cache, cache_index=0, last_only=True,
                       heads=("lm",))
  first_lp_BxV = jax.nn.log_softmax(out["logits"][:, -1].astype(jnp.float32), axis=-1)
  # Every option of a set continues the same prompt: repeat its cache N times.
  cache_rep = [{k: jnp.repeat(v, N, axis=0) for k, v in c.items()} for c in out["cache"]]
  opts_RxT = opts_BxNxT.reshape(B * N, T)
  omask_RxT = omask_BxNxT.reshape(B * N, T).astype(bool)
  n_prompt_B = pmask.sum(axis=1).astype(jnp.int32)
  pos_RxT = jnp.repeat(n_prompt_B, N)[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]
  mask_RxS = jnp.concatenate([jnp.repeat(pmask, N, axis=0), omask_RxT], axis=1)
  out2 = models.forward(cfg, params, opts_RxT, pos_RxT, mask_RxS, cache=cache_rep,
                        cache_index=P, heads=("lm",))
  lp_RxTxV = jax.nn.log_softmax(out2["logits"].astype(jnp.float32), axis=-1)
  first_lp_RxV = jnp.repeat(first_lp_BxV, N, axis=0)
  first_R = jnp.take_along_axis(first_lp_RxV, opts_RxT[:, :1], axis=1)[:, 0]
  rest_RxT1 = jnp.take_along_axis(lp_RxTxV[:, :-1], opts_RxT[:, 1:, None], axis=2)[..., 0]
  total_R = (jnp.where(omask_RxT[:, 0], first_R, 0.0)
             + jnp.sum(jnp.where(omask_RxT[:, 1:], rest_RxT1, 0.0), axis=1))
  return total_R.reshape(B, N)


def option_logprobs(cfg, params, prompt_ids: Sequence[Sequence[int]],
                    option_ids: Sequence[Sequence[Sequence[int]]], *,
                    max_tokens: int = 4096, pad_id: int = 0,
                    progress=None) -> list[np.ndarray]:
  """Per question i, the N_i-vector of log P(option_ij | prompt_i), float64.

  prompt_ids[i]: token ids of the prompt; option_ids[i][j]: token ids of the
  j-th option (non-empty). `max_tokens` bounds the padded prompt tokens per call.
  `progress`: optional callable(n_done) invoked after each call.
  """
  if len(prompt_ids) != len(option_ids):
    raise ValueError("prompt_ids and option_ids differ in length")
  for i, (p, opts) in enumerate(zip(prompt_ids, option_ids)):
    if not len(p):
      raise ValueError(f"question {i}: empty prompt")
    if not opts or any(len(o) == 0 for o in opts):
      raise ValueError(f"question {i}: no options or an empty option")
    if len(p) + max(len(o) for o in opts) > cfg.max_position_embeddings:
      raise InputError(f"question {i}: {len(p)} prompt tokens and its longest option do not "
                       f"fit the model's context of {cfg.max_position_embeddings}; shorten the "
                       "question or use fewer few-shot examples")
  keys = [(bucket_length(len(p)), len(opts), bucket_length(max(len(o) for o in opts)))
          for p, opts in zip(prompt_ids, option_ids)]
  results: list = [None] * len(prompt_ids)
  for idx in group_by_shape(keys, max_tokens, lambda k: k[0] + k[1] * k[2]):
    P, N, T = keys[idx[0]]
    # Pad the batch to a power of two (a partial last group then reuses a
    # compiled shape); padded rows repeat the first question and are dropped.
    B = 1 << (len(idx) - 1).bit_length()
    idx_rows = list(idx) + [idx[0]] * (B - len(idx))
    prompt = np.full((B, P), pad_id, np.int32)
    pmask = np.zeros((B, P), bool)
    opts = np.full((B, N, T), pad_id, np.int32)
    omask = np.zeros((B, N, T), bool)
    for b, i in enumerate(idx_rows):
      p = prompt_ids[i]
      prompt[b, P - len(p):] = p
      pmask[b, P - len(p):] = True
      for j, o in enumerate(option_ids[i]):
        opts[b, j, :len(o)] = o
        omask[b, j, :len(o)] = True
    lp_BxN = np.asarray(_set_logprobs(cfg, params, jnp.asarray(prompt), jnp.asarray(pmask),
                                      jnp.asarray(opts), jnp.asarray(omask)), np.float64)
    for b, i in enumerate(idx):
      results[i] = lp_BxN[b]
    if progress is not None:
      progress(len(idx))
  return results

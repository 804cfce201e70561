"""The compiled sampler: prefill plus a `lax.while_loop` decode over a KV cache.

One jitted call per batch: the prompt is run once to fill a preallocated
per-layer KV cache (B x S slots, S = prompt bucket + max_new_tokens), then each
loop step feeds the previous token at its slot. Rows stop on an EOS id or when
the stop automaton (see `stops.py`) fires; stopped rows emit padding. The loop
ends when every row has stopped or `max_new_tokens` tokens were made, with no
host round trip per token.

Sampling avoids whole-vocabulary sorts and per-token random numbers, which cost
more than the model step on CPU: inverse-CDF sampling in two levels (blocks of
the vocabulary, then tokens in the chosen block) with cumulative sums done as
small triangular matmuls, and top-p by bisection on the float bits of the
probability threshold (exact, no sort).
"""
from __future__ import annotations

import collections
import functools
import weakref
from typing import NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from cai_jax import cpu_backend
from cai_jax import models
from cai_jax import multihost
from cai_jax import sharding as sharding_lib
from cai_jax.models import decode as decode_lib
from cai_jax.sampling import stops as stops_lib
from cai_jax.utils import InputError

# How many times each jitted entry point has been traced (= compiled); tests
# read this to bound recompilation.
TRACE_COUNTS: collections.Counter = collections.Counter()

# Vocabulary block width of the two-level inverse-CDF sampler.
_BLOCK = 256
# Shortest prompt prefix common to a whole batch that is run once and shared
# (its KV stored once) instead of per row; few-shot CAI prompts share long ones.
MIN_SHARED_PREFIX = 16
# A shared prefix is cut to a multiple of this: a few-shot header keeps all but
# a few of its tokens shared, and one header gives one length (one compile).
PREFIX_STEP = 8
# (step, up to) of the length grid of `bucket_length`, then steps of 512.
_GRID = ((8, 64), (16, 128), (32, 256), (128, 1024))
# A prefill is packed (run on the batch's real prompt tokens only) when that
# drops at least 1/PACK_STEPS of its slots; its token count is rounded up to a
# multiple of 1/PACK_STEPS of the slots, so one batch shape compiles at most
# PACK_STEPS - 1 packed variants.
PACK_STEPS = 8


class PromptTooLongError(InputError):
  """A prompt does not fit in the model's context with max_new_tokens."""


class SampleOutput(NamedTuple):
  tokens_BxN: np.ndarray     # int32; pad_id after a row stops
  logprobs_BxN: np.ndarray   # float32 log-probs of the sampled tokens at T=1; 0 after stop
  lengths_B: np.ndarray      # int32 generated tokens including the EOS/stop token
  finished_B: np.ndarray     # bool: stopped on EOS or a stop sequence


def compile_count(name: Optional[str] = None) -> int:
  """Traces so far of one entry point ("sample", "score") or of all of them."""
  return TRACE_COUNTS[name] if name else sum(TRACE_COUNTS.values())


def bucket_length(n: int) -> int:
  """Padded length on a coarse grid: x8 to 64, x16 to 128, x32 to 256, x128 to 1024,
  then x512 (few distinct lengths, little padding for short chat prompts)."""
  n = max(int(n), 1)
  for step, upto in _GRID:
    if n <= upto:
      return -(-n // step) * step
  return -(-n // 512) * 512


def shared_prefix_len(tokens_BxP: np.ndarray, mask_BxP: np.ndarray,
                      min_len: Optional[int] = None) -> int:
  """Length of the prompt prefix that every row of a left-padded batch starts with.

  At most one less than the shortest prompt (each row keeps a token of its own),
  rounded down to a multiple of PREFIX_STEP (few distinct values, so few compilations);
  0 if shorter than `min_len` (default MIN_SHARED_PREFIX) or the batch has one row.
  """
  min_len = MIN_SHARED_PREFIX if min_len is None else min_len
  B, P = tokens_BxP.shape
  lens = mask_BxP.sum(1)
  shortest = int(lens.min()) if B else 0
  if B < 2 or shortest - 1 < min_len:
    return 0
  start = P - lens
  aligned = tokens_BxP[np.arange(B)[:, None], start[:, None] + np.arange(shortest)[None, :]]
  differs = np.nonzero((aligned != aligned[:1]).any(0))[0]
  n = min(int(differs[0]) if len(differs) else shortest, shortest - 1)
  n = n // PREFIX_STEP * PREFIX_STEP
  return n if n >= min_len else 0


def _cumsum_mm(x_WxB):
  """Inclusive cumulative sum along the first axis as a matmul (fast on CPU)."""
  W = x_WxB.shape[0]
  tri = jnp.tril(jnp.ones((W, W), x_WxB.dtype))
  return jnp.matmul(tri, x_WxB, precision=jax.lax.Precision.HIGHEST)


def _first_true_or_last(cond_WxB, nonzero_WxB):
  """Per column: index of the first entry both true and nonzero; else the last nonzero."""
  W = cond_WxB.shape[0]
  ok = cond_WxB & nonzero_WxB
  idx = jnp.arange(W)[:, None]
  first = jnp.min(jnp.where(ok, idx, W), axis=0)
  last_nz = jnp.max(jnp.where(nonzero_WxB, idx, -1), axis=0)
  return jnp.where(first < W, first, jnp.maximum(last_nz, 0))


def key_seed(key) -> int:
  """An int seed drawn from a PRNG key (the sampler's `seed`, a numpy Generator's)."""
  return int(jax.random.randint(key, (), 0, 2**31 - 1))


def row_keys(rng, ids_B):
  """Each row's own key: fold_in(rng, its id). A row's samples then depend on
  its id and the seed only, not on the batch, slot or shard it ran in."""
  return jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.asarray(ids_B, jnp.int32))


def step_keys(keys_B, step_B):
  """The keys of each row's token number `step` (a scalar or one per row)."""
  step_B = jnp.broadcast_to(jnp.asarray(step_B, jnp.int32), keys_B.shape[:1])
  return jax.vmap(jax.random.fold_in)(keys_B, step_B)


def _inverse_cdf(weights_VxB, keys_B):
  """Samples one index per column with probability proportional to the
  weights, column b from its own key keys_B[b]."""
  V, B = weights_VxB.shape
  C = -(-V // _BLOCK)
  w = jnp.pad(weights_VxB, ((0, C * _BLOCK - V), (0, 0))).reshape(C, _BLOCK, B)
  block_sum_CxB = w.sum(1)
  cum_CxB = _cumsum_mm(block_sum_CxB)
  # u in (0, total]: a zero-weight index can never be chosen.
  u01_B = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(keys_B)
  u_B = (1.0 - u01_B) * cum_CxB[-1]
  blk_B = _first_true_or_last(cum_CxB >= u_B[None, :], block_sum_CxB > 0)
  before_B = (jnp.take_along_axis(cum_CxB, blk_B[None, :], 0)[0]
              - jnp.take_along_axis(block_sum_CxB, blk_B[None, :], 0)[0])
  inner_WxB = jnp.take_along_axis(w, blk_B[None, None, :], 0)[0]
  cum_WxB = _cumsum_mm(inner_WxB)
  j_B = _first_true_or_last(cum_WxB >= (u_B - before_B)[None, :], inner_WxB > 0)
  return (blk_B * _BLOCK + j_B).astype(jnp.int32)


def _nucleus(weights_VxB, top_p):
  """Zeroes all but the smallest set of largest weights holding top_p of each column's mass.

  The threshold is found by bisection on the int32 bit pattern of positive
  float32 values (monotone in the value), so it is exact after 32 steps.
  """
  target_B = top_p * weights_VxB.sum(0)
  bits = jax.lax.bitcast_convert_type(weights_VxB, jnp.int32)

  def mass_at_least(t_B):
    return jnp.where(bits >= t_B[None, :], weights_VxB, 0.0).sum(0)

  def step(_, lo_hi):
    lo, hi = lo_hi
    mid = lo + (hi - lo) // 2
    ok = mass_at_least(mid) >= target_B
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

  B = weights_VxB.shape[1]
  lo = jnp.zeros((B,), jnp.int32)
  hi = bits.max(0) + 1
  lo, _ = jax.lax.fori_loop(0, 32, step, (lo, hi))
  return jnp.where(bits >= lo[None, :], weights_VxB, 0.0)


def _pick(logits_VxB, keys_B, temperature, top_p, *, greedy, top_k, use_top_p, unit_temp):
  """(token_B, logprob_B): a token per column of vocabulary-major logits and its
  log-prob under the raw T=1 softmax."""
  m_B = jnp.max(logits_VxB, axis=0, keepdims=True)
  e1 = jnp.exp(logits_VxB - m_B)
  lse_B = m_B[0] + jnp.log(e1.sum(0))
  if greedy:
    tok = jnp.argmax(logits_VxB, axis=0).astype(jnp.int32)
  else:
    x = logits_VxB
    if top_k > 0:
      kth_B = jax.lax.top_k(x.T, top_k)[0][:, -1]
      keep = x >= kth_B[None, :]
    else:
      keep = None
    if unit_temp:
      w = e1
    else:
      w = jnp.exp((x - m_B) / temperature)
    if keep is not None:
      w = jnp.where(keep, w, 0.0)
    if use_top_p:
      w = _nucleus(w, top_p)
    tok = _inverse_cdf(w, keys_B)
  lp = jnp.take_along_axis(logits_VxB, tok[None, :], 0)[0] - lse_B
  return tok, lp


def _logits_VxB(cfg, head_VxD, h_BxD):
  """Vocabulary-major float32 logits: head @ h^T. On XLA:CPU this runs the
  skinny LM-head matmul without packing the VxD weight (benchmarks/README.md),
  and the softmax/sampling reductions then run along the major axis, vectorised
  over the rows."""
  return jax.lax.dot_general(head_VxD, h_BxD.astype(cfg.jnp_dtype), (((1,), (1,)), ((), ())),
                             preferred_element_type=jnp.float32)


def _cache_constraint(cfg, cache, mesh):
  """Shards the per-row k/v of each layer (a shared prefix is left as is)."""
  if mesh is None:
    return cache
  specs = models.cache_logical_axes(cfg)[0]
  s = {n: NamedSharding(mesh, sharding_lib.logical_to_mesh_spec(specs[n], cache[0][n].shape, mesh))
       for n in ("k", "v")}
  return [dict(c, **{n: jax.lax.with_sharding_constraint(c[n], s[n]) for n in ("k", "v")})
          for c in cache]


def _prefix_kv(cfg, params, prefix_1xL):
  """Per-layer {"prefix_k": KxHxL, "prefix_v": KxLxH} of one prompt prefix."""
  L = prefix_1xL.shape[1]
  pos = jnp.arange(L, dtype=jnp.int32)[None, :]
  out = models.forward(cfg, params, prefix_1xL, pos, jnp.ones((1, L), bool),
                       cache=models.init_cache(cfg, 1, L), cache_index=0, last_only=True,
                       heads=())
  return [{"prefix_k": c["k"][0], "prefix_v": c["v"][0]} for c in out["cache"]]


def pack_prompts(mask_BxP: np.ndarray, steps: int = PACK_STEPS):
  """The packed-prefill layout of a left-padded batch, or None when packing
  would not drop at least 1/`steps` of the B*P slots.

  Returns (pack_index_BxP, slot_index_T) as `models.forward(pack=...)` reads
  them: T is the real-token count rounded up to a multiple of ceil(B*P/steps)
  (few distinct T, so few compilations); filler entries point at slot 0.
  """
  B, P = mask_BxP.shape
  slots = np.flatnonzero(mask_BxP.reshape(-1))
  unit = -(-B * P // steps)
  T = -(-len(slots) // unit) * unit
  if T >= B * P:
    return None
  pack_index = np.zeros(B * P, np.int32)
  pack_index[slots] = np.arange(len(slots), dtype=np.int32)
  slot_index_T = np.zeros(T, np.int32)
  slot_index_T[:len(slots)] = slots
  return pack_index.reshape(B, P), slot_index_T


def _sample_impl(params, decode_w, tokens_BxP, mask_BxP, prefix, pack, keys_B, temperature,
                 top_p, eos_E, stop_next_SxV, pad_id, *, cfg, max_new_tokens, greedy, top_k,
                 use_top_p, unit_temp, mesh):
  """prefix (or None): `prefix_kv` of the tokens every row starts with;
  tokens_BxP then hold each row's remaining (left-padded) prompt tokens.
  pack (or None): `pack_prompts` of mask_BxP; the prefill then runs on the
  real tokens only. decode_w (or None): `decode_lib.decode_weights` of params;
  the decode steps then run `decode_lib.decode_step` (feature-major)."""
  TRACE_COUNTS["sample"] += 1
  B, P = tokens_BxP.shape
  N = max_new_tokens
  Lp = 0 if prefix is None else prefix[0]["prefix_k"].shape[-1]
  pick = functools.partial(_pick, temperature=temperature, top_p=top_p, greedy=greedy,
                           top_k=top_k, use_top_p=use_top_p, unit_temp=unit_temp)
  mask_BxP = mask_BxP.astype(bool)
  # Slots past the prompt are valid once written; the model's causal rule
  # (slot <= write index) hides the ones not written yet.
  mask_BxS = jnp.concatenate([mask_BxP, jnp.ones((B, N), bool)], axis=1)
  prompt_len_B = Lp + mask_BxP.sum(-1).astype(jnp.int32)
  cache = models.init_cache(cfg, B, P + N)
  if Lp:
    cache = [dict(c, **pc) for c, pc in zip(cache, prefix)]
  cache = _cache_constraint(cfg, cache, mesh)
  head_VxD = models.lm_head_weight(cfg, params).T.astype(cfg.jnp_dtype)
  tokens, positions = tokens_BxP, Lp + models.positions_from_mask(mask_BxP)
  if pack is not None:
    tokens, positions = (a.reshape(1, -1)[:, pack[1]] for a in (tokens, positions))
  out = models.forward(cfg, params, tokens, positions, mask_BxS, cache=cache, cache_index=0,
                       last_only=True, heads=(), pack=pack)
  cache = _cache_constraint(cfg, out["cache"], mesh)

  def advance(tok_B, state_B, done_B):
    """Stop bookkeeping for a new token; returns (state, done, emitted)."""
    nxt_B = stop_next_SxV[state_B, tok_B]
    stopped = jnp.isin(tok_B, eos_E) | (nxt_B < 0)
    return jnp.maximum(nxt_B, 0), done_B | stopped

  tok0, lp0 = pick(_logits_VxB(cfg, head_VxD, out["hidden"][:, 0]), step_keys(keys_B, 0))
  state0, done0 = advance(tok0, jnp.zeros((B,), jnp.int32), jnp.zeros((B,), bool))
  toks_BxN = jnp.full((B, N), pad_id, jnp.int32).at[:, 0].set(tok0)
  lps_BxN = jnp.zeros((B, N), jnp.float32).at[:, 0].set(lp0)
  carry = (jnp.int32(1), tok0, cache, toks_BxN, lps_BxN, done0, jnp.ones((B,), jnp.int32),
           state0)

  def cond(c):
    i, done = c[0], c[5]
    return (i < N) & ~jnp.all(done)

  def body(c):
    i, prev_B, cache, toks, lps, done, lengths, state = c
    slot = P + i - 1
    pos_B = prompt_len_B + i - 1
    if decode_w is None:
      o = models.forward(cfg, params, prev_B[:, None], pos_B[:, None], mask_BxS, cache=cache,
                         cache_index=slot, last_only=True, heads=())
      logits_VxB, new_cache = _logits_VxB(cfg, head_VxD, o["hidden"][:, 0]), o["cache"]
    else:
      h_DxB, new_cache = decode_lib.decode_step(cfg, decode_w, params, prev_B, pos_B,
                                                mask_BxS, cache, slot)
      logits_VxB = jax.lax.dot(head_VxD, h_DxB, preferred_element_type=jnp.float32)
    tok, lp = pick(logits_VxB, step_keys(keys_B, i))
    live = ~done
    tok = jnp.where(live, tok, pad_id)
    new_state, new_done = advance(tok, state, done)
    toks = jax.lax.dynamic_update_slice(toks, tok[:, None], (0, i))
    lps = jax.lax.dynamic_update_slice(lps, jnp.where(live, lp, 0.0)[:, None], (0, i))
    return (i + 1, tok, _cache_constraint(cfg, new_cache, mesh), toks, lps,
            jnp.where(live, new_done, done), lengths + live.astype(jnp.int32),
            jnp.where(live, new_state, state))

  carry = jax.lax.while_loop(cond, body, carry)
  _, _, _, toks, lps, done, lengths, _ = carry
  return toks, lps, lengths, done


_STATIC = ("cfg", "max_new_tokens", "greedy", "top_k", "use_top_p", "unit_temp", "mesh")


def compiled(fn, static_argnames, options, donate_argnums=()):
  """`jax.jit(fn)` compiled with these XLA options (None: the defaults), one
  jitted function per (fn, options); each batch shape maps to one of them,
  so the CPU backend's choices add no compilations."""
  key = (fn, tuple(sorted((options or {}).items())))
  if key not in _JITS:
    _JITS[key] = jax.jit(fn, static_argnames=static_argnames, donate_argnums=donate_argnums,
                         compiler_options=dict(options) if options else None)
  return _JITS[key]


_JITS: dict = {}


class ParamsMemo:
  """Values computed from params (and a hashable key), kept while those very
  params are alive: a run that samples many batches from the same params (a
  stage, a rollout) computes them once. Entries hold weak references to the
  params' leaves, so new params (after a training step) miss; at most `size`
  entries, the oldest dropped first."""

  def __init__(self, fn, size: int):
    self.fn, self.size = fn, size
    self.entries: collections.OrderedDict = collections.OrderedDict()
    self.misses = 0

  def __call__(self, cfg, params, key=()):
    leaves = jax.tree_util.tree_leaves(params)
    hit = self.entries.get((cfg, key))
    if hit is not None:
      refs, value = hit
      if len(refs) == len(leaves) and all(r() is x for r, x in zip(refs, leaves)):
        self.entries.move_to_end((cfg, key))
        return value
    self.entries.pop((cfg, key), None)
    # Entries of params that are gone free their memory before a new one is made.
    for k in [k for k, (refs, _) in self.entries.items() if any(r() is None for r in refs)]:
      del self.entries[k]
    while len(self.entries) >= self.size:
      self.entries.popitem(last=False)
    self.misses += 1
    value = self.fn(cfg, params, key)
    try:
      refs = [weakref.ref(x) for x in leaves]
    except TypeError:  # a leaf that cannot be weakly referenced: no reuse
      return value
    self.entries[(cfg, key)] = (refs, value)
    return value


_decode_weights_jit = jax.jit(decode_lib.decode_weights, static_argnums=0)
# The transposed weights are a second copy of the trunk: one params' worth.
_decode_weights = ParamsMemo(lambda cfg, params, _: _decode_weights_jit(cfg, params), size=1)
_prefix_kv_jit = jax.jit(_prefix_kv, static_argnums=0)
# The KV of a shared prompt prefix (few-shot dialogues, a labelling header,
# a system prompt), computed once per (params, prefix) for every batch of a
# stage; a stage alternates a few prompt kinds (critique, revision).
prefix_kv = ParamsMemo(
    lambda cfg, params, prefix: _prefix_kv_jit(cfg, params, jnp.asarray([prefix], jnp.int32)),
    size=4)


def check_settings(cfg, max_new_tokens, temperature, top_k, top_p, greedy):
  """One-line errors for sampling settings no sampler can run."""
  if int(np.min(max_new_tokens)) < 1:
    raise InputError(f"sample: max_new_tokens={int(np.min(max_new_tokens))} must be >= 1")
  if not greedy and not temperature > 0:
    raise InputError(f"sample: temperature={temperature} must be > 0 (or use greedy=True)")
  if not 0 < top_p <= 1:
    raise InputError(f"sample: top_p={top_p} must be in (0, 1]")
  if top_k < 0 or top_k > cfg.vocab_size:
    raise InputError(f"sample: top_k={top_k} must be in [0, vocab_size={cfg.vocab_size}]")


def _check_left_padded(mask: np.ndarray):
  bad = np.nonzero((np.diff(mask.astype(np.int8), axis=1) < 0).any(axis=1))[0]
  if len(bad):
    raise InputError(f"sample: prompt_mask row {int(bad[0])} is not left-padded "
                     "(real tokens must be contiguous at the right end); left-pad the batch")
  empty = np.nonzero(mask.sum(1) == 0)[0]
  if len(empty):
    raise InputError(f"sample: prompt row {int(empty[0])} has no tokens; "
                     "give every row at least one token")


def _as_key(rng):
  if isinstance(rng, (int, np.integer)):
    return jax.random.PRNGKey(int(rng))
  return rng


def sample(cfg, params, prompt_tokens_BxP, prompt_mask_BxP, rng, *, max_new_tokens: int,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, greedy: bool = False,
           eos_ids: Sequence[int] = (2,),
           stop_seqs: Union[Sequence[Sequence[int]], stops_lib.StopMatcher] = (),
           mesh=None, pad_id: Optional[int] = None, bucket: bool = True,
           share_prefix: bool = True, pack_prefill: bool = True, keys=None) -> SampleOutput:
  """Samples continuations of a left-padded batch of prompts.

  stop_seqs: token-id sequences that end a row when generated, or a
  `StopMatcher` (e.g. from `stops.from_strings`) for exact stop strings.
  bucket: pad the prompt length to `bucket_length` so that different lengths
  share compiled code. share_prefix: run a prompt prefix common to all rows
  (`shared_prefix_len`, e.g. a system or few-shot prompt) once and keep one
  copy of its KV for the batch. pack_prefill: without a mesh, run the prompt
  through the model on its real tokens only, not the padded BxP slots
  (`pack_prompts`; SmolLM2 at 64 unsorted chat prompts: 42% of the slots are
  padding); a caller that batches prompts of similar lengths and counts
  compilations turns it off. With a mesh, params should be sharded on it
  (they are placed if not) and the batch is split over its batch axes.
  keys: one PRNG key per row (default `row_keys(rng, range(B))`): row b's
  token i is drawn from `step_keys(keys[b], i)`, as in `sampling.engine`.
  """
  tokens = np.asarray(prompt_tokens_BxP, np.int32)
  mask = np.asarray(prompt_mask_BxP).astype(bool)
  if tokens.ndim != 2 or tokens.shape != mask.shape:
    raise InputError(f"sample: prompt tokens {tokens.shape} and mask {mask.shape} must be "
                     "equal BxP arrays")
  check_settings(cfg, max_new_tokens, temperature, top_k, top_p, greedy)
  _check_left_padded(mask)
  longest = int(mask.sum(1).max())
  ctx = cfg.max_position_embeddings
  if longest + max_new_tokens > ctx:
    raise PromptTooLongError(
        f"sample: a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds "
        f"the context of {ctx}; shorten the prompt or lower max_new_tokens")
  pad_id = (cfg.pad_token_id if cfg.pad_token_id is not None else 0) if pad_id is None else pad_id
  Lp = shared_prefix_len(tokens, mask) if share_prefix else 0
  prefix = None
  if Lp:
    # The prefix comes off every row; the rest stays left-padded to the
    # caller's width less Lp (so the caller's length buckets still hold).
    # Row i's rest (its last n_i - Lp tokens) lands at rest column c = original
    # column c + Lp, and rest column c is real exactly when original column c was.
    P0 = tokens.shape[1]
    start = P0 - int(mask[0].sum())
    prefix = tokens[:1, start:start + Lp].copy()
    mask = mask[:, :P0 - Lp]
    tokens = np.where(mask, tokens[:, Lp:], np.int32(pad_id)).astype(np.int32)
  B0, P0 = tokens.shape
  P = bucket_length(P0) if bucket else P0
  d = sharding_lib.batch_divisor(mesh) if mesh is not None else 1
  B = -(-B0 // d) * d
  if P > P0 or B > B0:
    t = np.full((B, P), pad_id, np.int32)
    m = np.zeros((B, P), bool)
    t[:B0, P - P0:], m[:B0, P - P0:] = tokens, mask
    m[B0:, -1] = True  # filler rows: one pad token so their attention is well defined
    tokens, mask = t, m
  if isinstance(stop_seqs, stops_lib.StopMatcher):
    matcher = stop_seqs
  else:
    matcher = stops_lib.from_token_seqs(stop_seqs, cfg.vocab_size)
  eos = np.asarray(sorted(set(int(e) for e in eos_ids)) or [-1], np.int32)
  tok_in, mask_in = jnp.asarray(tokens), jnp.asarray(mask)
  pack = pack_prompts(mask) if pack_prefill and mesh is None else None
  if mesh is not None:
    params = sharding_lib.shard_params(params, cfg, mesh)
    tok_in, mask_in = sharding_lib.shard_batch((tokens, mask), mesh)
  if keys is None:
    keys = row_keys(_as_key(rng), jnp.arange(B))
  else:
    keys = jnp.asarray(keys)
    if keys.shape[0] != B0:
      raise InputError(f"sample: {keys.shape[0]} keys for {B0} rows; give one per row")
    keys = jnp.concatenate([keys, jnp.zeros((B - B0,) + keys.shape[1:], keys.dtype)])
  if mesh is not None:
    keys = sharding_lib.shard_batch(keys, mesh)
  feature_major, options = cpu_backend.decode_program(mesh, B // d, cfg.scan_layers)
  decode_w = _decode_weights(cfg, params) if feature_major else None
  toks, lps, lengths, done = compiled(_sample_impl, _STATIC, options)(
      params, decode_w, tok_in, mask_in,
      None if prefix is None else prefix_kv(cfg, params, tuple(int(t) for t in prefix[0])),
      None if pack is None else tuple(jnp.asarray(a) for a in pack), keys,
      jnp.float32(temperature if not greedy else 1.0),
      jnp.float32(top_p), jnp.asarray(eos), jnp.asarray(matcher.next_SxV), jnp.int32(pad_id),
      cfg=cfg, max_new_tokens=int(max_new_tokens), greedy=bool(greedy), top_k=int(top_k),
      use_top_p=bool(top_p < 1.0) and not greedy,
      unit_temp=bool(greedy or temperature == 1.0), mesh=mesh)
  # Multi-host: outputs span every host's devices; gather them to each host.
  toks, lps, lengths, done = multihost.to_host((toks, lps, lengths, done))
  return SampleOutput(np.asarray(toks)[:B0], np.asarray(lps)[:B0],
                      np.asarray(lengths)[:B0], np.asarray(done)[:B0])

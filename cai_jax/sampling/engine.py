"""Continuous batching: a fixed set of decode slots, refilled as rows finish.

The static sampler (`sampler.sample`) prefills a batch together and decodes
until its longest row stops, so a row that stops early leaves its slot idle
for the rest of the batch. Here each of `slots` rows owns one line of the KV
cache and its own write index (`transformer.cached_attention` with per-row
indices): the prompt is written at the start of the line, each new token at
the row's own length. Decoding runs in jitted blocks of `block` steps; between
blocks the host collects the rows that stopped (EOS, a stop sequence, the
budget) and prefills waiting prompts into the freed slots.

Once no prompt waits, the rows still decoding move into half as many slots
whenever they fit (down to MIN_SLOTS and the mesh's batch divisor), so the last long rows
of a call, or of a PPO batch, do not pay for the slots of rows that stopped.

Compiled shapes stay bounded whatever the number of prompts: one decode block
per (slots, line length, attention window, shared prefix length), with at
most three windows per line (`window_for`), and one prefill per (group
size, prompt width, shared prefix length, packed or not), with group sizes
from `group_sizes` and widths from `prefill_width`: a bounded number of
programs for any number of prompts, which a stage's calls reuse.

Row r draws token i from `sampler.step_keys(keys[r], i)`, and the static
sampler gives row b of its batch the key `row_keys(rng, b)`: with keys =
`row_keys(rng, range(n))` both return the same tokens for the same prompts,
whichever slot or refill group a row ran in (equal wherever float rounding
agrees: attention then sums over differently laid-out lines).

A prompt prefix common to all prompts (few-shot dialogues, a labelling
header) is run once and its KV kept by `sampler.prefix_kv` across calls, so a
stage's batches and refills attend to one stored copy.
"""
from __future__ import annotations

import collections
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cai_jax import cpu_backend
from cai_jax import models
from cai_jax.models import decode as decode_lib
from cai_jax import multihost
from cai_jax import sharding as sharding_lib
from cai_jax.sampling import sampler as S
from cai_jax.sampling import stops as stops_lib
from cai_jax.utils import InputError

# Decode steps per jitted block: a row that stops inside a block idles for
# the rest of it, and each block ends with one small host round trip.
BLOCK = 8
# Slots below which a draining call stops halving them: each slot count is
# one more decode program to compile, for little decode work left (a stage's
# small calls paid more in compiling 4-slot programs than they saved).
MIN_SLOTS = 8
# Least share of a prefill group's slots that its prompts would take at their
# own widths; a group below it is split into smaller ones (`admit_size`).
MIN_FILL = 3 / 4
# Narrowest prefill group width (`prefill_width`).
MIN_PREFILL_WIDTH = 128
# Smallest attention window of a decode block (see `window_for`): below it a
# line is cheap to read whole, and each window is one more decode program.
MIN_WINDOW = 512


def common_prefix_len(rows: Sequence[Sequence[int]], min_len: Optional[int] = None) -> int:
  """`sampler.shared_prefix_len` for a list of token lists: the length of the
  prefix all rows start with, at most one less than the shortest row, cut to
  a multiple of PREFIX_STEP; 0 below `min_len` (default MIN_SHARED_PREFIX) or
  for fewer than two rows."""
  min_len = S.MIN_SHARED_PREFIX if min_len is None else min_len
  if len(rows) < 2:
    return 0
  shortest = min(len(r) for r in rows)
  first = rows[0]
  n = shortest
  for r in rows[1:]:
    k = 0
    while k < n and r[k] == first[k]:
      k += 1
    n = k
  n = min(n, shortest - 1) // S.PREFIX_STEP * S.PREFIX_STEP
  return n if n >= min_len else 0


def _with_prefix(cache, prefix):
  return cache if prefix is None else [dict(c, **p) for c, p in zip(cache, prefix)]


def _rows_only(cache):
  return [{"k": c["k"], "v": c["v"]} for c in cache]


def _admit_impl(params, state, prefix, slots_R, tokens_RxP, lens_R, pack, keys_R, budget_R,
                temperature, top_p, eos_E, stop_next_SxV, pad_id, *, cfg, greedy, top_k,
                use_top_p, unit_temp, mesh):
  """Prefills R prompts (right-padded, lens_R real tokens) into slots_R and
  samples their first tokens. pack (or None): `sampler.pack_prompts` of the
  prompts' mask; the projections and MLP then run on their real tokens only."""
  S.TRACE_COUNTS["engine_admit"] += 1
  R, P = tokens_RxP.shape
  Lp = 0 if prefix is None else prefix[0]["prefix_k"].shape[-1]
  mask_RxP = jnp.arange(P)[None, :] < lens_R[:, None]
  positions = Lp + jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (R, P))
  cache = _with_prefix(models.init_cache(cfg, R, P), prefix)
  tokens = tokens_RxP
  if pack is not None:
    tokens, positions = (a.reshape(1, -1)[:, pack[1]] for a in (tokens_RxP, positions))
  out = models.forward(cfg, params, tokens, positions, mask_RxP, cache=cache,
                       cache_index=0, heads=(), pack=pack)
  if pack is None:
    h_RxD = out["hidden"][jnp.arange(R), lens_R - 1]
  else:
    h_RxD = out["hidden"][0][pack[0][jnp.arange(R), lens_R - 1]]
  head_VxD = models.lm_head_weight(cfg, params).T.astype(cfg.jnp_dtype)
  tok, lp = S._pick(S._logits_VxB(cfg, head_VxD, h_RxD), S.step_keys(keys_R, 0), temperature,
                    top_p, greedy=greedy, top_k=top_k, use_top_p=use_top_p,
                    unit_temp=unit_temp)
  nxt = stop_next_SxV[0, tok]
  stopped = jnp.isin(tok, eos_E) | (nxt < 0)
  lines = []
  for line, new in zip(state["cache"], out["cache"]):
    lines.append({"k": line["k"].at[slots_R, :, :, :P].set(new["k"]),
                  "v": line["v"].at[slots_R, :, :P, :].set(new["v"])})
  N = state["toks"].shape[1]
  st = dict(state, cache=S._cache_constraint(cfg, lines, mesh))
  st["tok"] = state["tok"].at[slots_R].set(tok)
  st["idx"] = state["idx"].at[slots_R].set(lens_R)
  st["pos"] = state["pos"].at[slots_R].set(Lp + lens_R)
  st["step"] = state["step"].at[slots_R].set(1)
  st["keys"] = state["keys"].at[slots_R].set(keys_R)
  st["budget"] = state["budget"].at[slots_R].set(budget_R)
  st["stop"] = state["stop"].at[slots_R].set(jnp.maximum(nxt, 0))
  st["finished"] = state["finished"].at[slots_R].set(stopped)
  st["live"] = state["live"].at[slots_R].set(~stopped & (budget_R > 1))
  st["toks"] = state["toks"].at[slots_R].set(
      jnp.full((R, N), pad_id, jnp.int32).at[:, 0].set(tok))
  st["lps"] = state["lps"].at[slots_R].set(jnp.zeros((R, N), jnp.float32).at[:, 0].set(lp))
  return st


def _decode_impl(params, decode_w, state, prefix, steps, temperature, top_p, eos_E,
                 stop_next_SxV, pad_id, *, cfg, greedy, top_k, use_top_p, unit_temp, mesh,
                 window):
  """Up to `steps` decode steps of every live slot (fewer once none is live),
  attending over the first `window` slots of each line: the host picks a
  window that holds every live row's writes in this block (`window_for`), so
  a step reads the filled part of the lines, not the whole lines. The mask's
  width is the window (`cached_attention` reads that many slots in place)."""
  S.TRACE_COUNTS["engine_decode"] += 1
  B, N = state["toks"].shape
  C = window
  mask_BxC = jnp.ones((B, C), bool)  # a row sees its own line up to its write index
  head_VxD = models.lm_head_weight(cfg, params).T.astype(cfg.jnp_dtype)
  rows = jnp.arange(B)

  def cond(c):
    i, st = c
    return (i < steps) & jnp.any(st["live"])

  def body(c):
    i, st = c
    idx = jnp.minimum(st["idx"], C - 1)  # a stopped row's writes land in its own line
    cache = _with_prefix(st["cache"], prefix)
    if decode_w is None:
      o = models.forward(cfg, params, st["tok"][:, None], st["pos"][:, None], mask_BxC,
                         cache=cache, cache_index=idx, last_only=True, heads=())
      logits_VxB, new_cache = S._logits_VxB(cfg, head_VxD, o["hidden"][:, 0]), o["cache"]
    else:
      h_DxB, new_cache = decode_lib.decode_step(cfg, decode_w, params, st["tok"], st["pos"],
                                                mask_BxC, cache, idx)
      logits_VxB = jax.lax.dot(head_VxD, h_DxB, preferred_element_type=jnp.float32)
    tok, lp = S._pick(logits_VxB, S.step_keys(st["keys"], st["step"]), temperature, top_p,
                      greedy=greedy, top_k=top_k, use_top_p=use_top_p, unit_temp=unit_temp)
    live = st["live"]
    nxt = stop_next_SxV[st["stop"], tok]
    stopped = jnp.isin(tok, eos_E) | (nxt < 0)
    col = jnp.minimum(st["step"], N - 1)
    new = dict(st, cache=S._cache_constraint(cfg, _rows_only(new_cache), mesh))
    new["toks"] = st["toks"].at[rows, col].set(jnp.where(live, tok, st["toks"][rows, col]))
    new["lps"] = st["lps"].at[rows, col].set(jnp.where(live, lp, st["lps"][rows, col]))
    new["tok"] = jnp.where(live, tok, st["tok"])
    inc = live.astype(jnp.int32)
    new["step"], new["idx"], new["pos"] = st["step"] + inc, st["idx"] + inc, st["pos"] + inc
    new["stop"] = jnp.where(live, jnp.maximum(nxt, 0), st["stop"])
    new["finished"] = st["finished"] | (live & stopped)
    new["live"] = live & ~stopped & (new["step"] < st["budget"])
    return i + 1, new

  return jax.lax.while_loop(cond, body, (jnp.int32(0), state))[1]


def _compact_impl(state, keep_K, *, cfg, mesh):
  """The state of slots keep_K only (a smaller decode batch)."""
  S.TRACE_COUNTS["engine_compact"] += 1
  out = {k: v[keep_K] for k, v in state.items() if k != "cache"}
  out["cache"] = S._cache_constraint(
      cfg, [{"k": c["k"][keep_K], "v": c["v"][keep_K]} for c in state["cache"]], mesh)
  return out


_compact_jit = jax.jit(_compact_impl, static_argnames=("cfg", "mesh"))
_SAMPLING_STATIC = ("cfg", "greedy", "top_k", "use_top_p", "unit_temp", "mesh")
_admit_jit = jax.jit(_admit_impl, static_argnames=_SAMPLING_STATIC, donate_argnums=(1,))


def _empty_state(cfg, slots: int, line: int, N: int, key_shape, key_dtype, mesh):
  state = {
      "cache": models.init_cache(cfg, slots, line),
      "tok": jnp.zeros((slots,), jnp.int32), "idx": jnp.zeros((slots,), jnp.int32),
      "pos": jnp.zeros((slots,), jnp.int32), "step": jnp.zeros((slots,), jnp.int32),
      "keys": jnp.zeros((slots,) + key_shape, key_dtype),
      "budget": jnp.zeros((slots,), jnp.int32), "stop": jnp.zeros((slots,), jnp.int32),
      "finished": jnp.zeros((slots,), bool), "live": jnp.zeros((slots,), bool),
      "toks": jnp.zeros((slots, N), jnp.int32), "lps": jnp.zeros((slots, N), jnp.float32)}
  if mesh is not None:  # the lines are split over the batch axes, like a static batch
    state["cache"] = _place_cache(state["cache"], cfg=cfg, mesh=mesh)
  return state


# One jitted placement per (cfg, mesh, shapes), not a fresh jit per call.
_place_cache = jax.jit(lambda cache, cfg, mesh: S._cache_constraint(cfg, cache, mesh),
                       static_argnames=("cfg", "mesh"))


def group_sizes(slots: int) -> list:
  """The prefill group sizes: powers of 4 below `slots`, and `slots` (the
  first fill). Refills of one row or a few are the common case."""
  sizes, r = [], 1
  while r < slots:
    sizes.append(r)
    r *= 4
  return sizes + [slots]


def window_for(line: int, need: int) -> int:
  """The attention window of a decode block whose live rows write up to slot
  need - 1: the smallest of line, line/2, line/4 that holds `need`, not below
  MIN_WINDOW (three decode programs per line at most)."""
  w = line
  for _ in range(2):
    if w // 2 >= max(need, MIN_WINDOW):
      w //= 2
  return w


def prefill_width(n: int, floor: int = MIN_PREFILL_WIDTH) -> int:
  """A prefill group's width for a longest prompt of n tokens: a power of two,
  at least `floor` (MIN_PREFILL_WIDTH, or less for a call of short
  prompts). Coarser than `sampler.bucket_length`'s grid: a stage's prompts
  then take few widths, and each width is one prefill program per group
  size (compiling one costs the prefill of more tokens than the coarser grid
  pads; benchmarks/README.md)."""
  return max(floor, 1 << (max(int(n), 1) - 1).bit_length())


def admit_size(sizes: Sequence[int], waiting: Sequence[int], free: int,
               floor: int = MIN_PREFILL_WIDTH) -> int:
  """The prefill group for the waiting prompts (their token counts, in
  admission order) and `free` slots: the largest group size that they fill,
  or, when every waiting prompt fits, the smallest size that holds them all
  (the rest idle slots), so a call of a few prompts prefills once, not as
  4 + 1; then smaller sizes while the group's rows at its width would hold
  more than 1/MIN_FILL times the slots of its prompts at their own widths
  (a long prompt does not pad many short ones: attention runs on the padded
  rows)."""
  fit = [g for g in sizes if len(waiting) <= g <= free]
  g = min(fit) if fit else max(g for g in sizes if g <= min(len(waiting), free))
  while g > sizes[0]:
    widths = [prefill_width(n, floor) for n in waiting[:g]]
    if MIN_FILL * len(widths) * max(widths) <= sum(widths):
      break
    g = max(s for s in sizes if s < g)
  return g


def generate_tokens(cfg, params, prompts: Sequence[Sequence[int]], keys, *,
                    max_new_tokens, slots: int = 16, temperature: float = 1.0, top_k: int = 0,
                    top_p: float = 1.0, greedy: bool = False, eos_ids: Sequence[int] = (2,),
                    stop_seqs=(), pad_id: Optional[int] = None, mesh=None,
                    block: int = BLOCK, share_prefix: bool = True, pack_prefill: bool = True,
                    on_done: Optional[Callable[[int], None]] = None,
                    between_blocks: Optional[Callable[[], None]] = None) -> S.SampleOutput:
  """Samples a continuation of every prompt (token lists) with `slots` rows
  decoding at a time; returns them in the prompts' order (tokens padded to the
  largest budget).

  keys: one PRNG key per prompt (an n x 2 array), or an int / key, read as
  `sampler.row_keys(key, range(n))` (the static sampler's keys for one batch).
  max_new_tokens: one budget for all prompts or one per prompt.
  on_done(i) is called as prompt i finishes; between_blocks() between decode
  blocks (an interrupt check).
  """
  n = len(prompts)
  ids = [list(map(int, p)) for p in prompts]
  budgets = np.broadcast_to(np.asarray(max_new_tokens, np.int64), (n,)).astype(np.int32)
  if n == 0:
    return S.SampleOutput(np.zeros((0, 1), np.int32), np.zeros((0, 1), np.float32),
                          np.zeros((0,), np.int32), np.zeros((0,), bool))
  S.check_settings(cfg, budgets, temperature, top_k, top_p, greedy)
  if slots < 1:
    raise InputError(f"sample: slots={slots} must be >= 1")
  for i, p in enumerate(ids):
    if not p:
      raise InputError(f"sample: prompt {i} has no tokens; give every prompt at least one")
    if len(p) + int(budgets[i]) > cfg.max_position_embeddings:
      raise S.PromptTooLongError(
          f"sample: prompt {i} of {len(p)} tokens plus max_new_tokens={int(budgets[i])} "
          f"exceeds the context of {cfg.max_position_embeddings}; shorten the prompt or lower "
          "max_new_tokens")
  if isinstance(keys, (int, np.integer)) or np.ndim(keys) == 1:
    keys = S.row_keys(S._as_key(keys), jnp.arange(n))
  keys = jnp.asarray(keys)
  if keys.shape[0] != n:
    raise InputError(f"sample: {keys.shape[0]} keys for {n} prompts; give one per prompt")
  pad_id = (cfg.pad_token_id if cfg.pad_token_id is not None else 0) if pad_id is None else pad_id
  matcher = stop_seqs if isinstance(stop_seqs, stops_lib.StopMatcher) else \
      stops_lib.from_token_seqs(stop_seqs, cfg.vocab_size)
  eos = jnp.asarray(np.asarray(sorted(set(int(e) for e in eos_ids)) or [-1], np.int32))
  stop_next = jnp.asarray(matcher.next_SxV)

  Lp = common_prefix_len(ids) if share_prefix else 0
  prefix = S.prefix_kv(cfg, params, tuple(ids[0][:Lp])) if Lp else None
  rest = [p[Lp:] for p in ids]
  d = sharding_lib.batch_divisor(mesh) if mesh is not None else 1
  # A call of few prompts takes a power of two of slots (few decode shapes).
  slots = -(-min(slots, 1 << (n - 1).bit_length()) // d) * d
  N = int(budgets.max())
  longest = max(len(r) for r in rest)
  # Each line holds a prompt (on the prefill grid) and its budget, rounded up
  # to a power of two: a stage's calls, whose longest prompts differ, then
  # share a few decode programs (a longer line costs attention only).
  # A call whose prompts are all short (a tiny model's, a PPO batch of short
  # prompts) is not padded up to MIN_PREFILL_WIDTH.
  floor = min(MIN_PREFILL_WIDTH, prefill_width(longest, 1))
  line = 1 << (prefill_width(longest, floor) + N - 1).bit_length()
  state = _empty_state(cfg, slots, line, N, keys.shape[1:], keys.dtype, mesh)

  def decoder(slots):
    feature_major, options = cpu_backend.decode_program(mesh, slots // d, cfg.scan_layers)
    decode_w = S._decode_weights(cfg, params) if feature_major else None
    return decode_w, S.compiled(_decode_impl, _SAMPLING_STATIC + ("window",), options,
                                donate_argnums=(2,))

  decode_w, decode = decoder(slots)
  common = dict(temperature=jnp.float32(temperature if not greedy else 1.0),
                top_p=jnp.float32(top_p), eos_E=eos, stop_next_SxV=stop_next,
                pad_id=jnp.int32(pad_id))
  static = dict(cfg=cfg, greedy=bool(greedy), top_k=int(top_k),
                use_top_p=bool(top_p < 1.0) and not greedy,
                unit_temp=bool(greedy or temperature == 1.0), mesh=mesh)

  # Longest prompts first: they fill the first groups together (one wide
  # prefill) and the short ones refill slots later.
  sizes = group_sizes(slots)
  waiting = collections.deque(sorted(range(n), key=lambda i: -len(rest[i])))
  free = list(range(slots))
  owner = [-1] * slots
  toks_out = np.full((n, N), pad_id, np.int32)
  lps_out = np.zeros((n, N), np.float32)
  lengths = np.zeros((n,), np.int32)
  finished = np.zeros((n,), bool)
  idx = np.zeros((slots,), np.int64)  # each slot's next write index, as the device has it
  while waiting or any(o >= 0 for o in owner):
    while waiting and free:
      r = admit_size(sizes, [len(rest[i]) for i in waiting], len(free), floor)
      group = [waiting.popleft() for _ in range(min(r, len(waiting)))]
      # Rows past the group's prompts fill the group size with idle slots:
      # one prompt token, no budget, never live, still free for a refill.
      idle = r - len(group)
      take = free[:r]
      free = free[len(group):]
      P = prefill_width(max(len(rest[i]) for i in group), floor)
      tok = np.full((r, P), pad_id, np.int32)
      for j, i in enumerate(group):
        tok[j, :len(rest[i])] = rest[i]
        owner[take[j]] = i
        idx[take[j]] = len(rest[i])
      rows = np.asarray(group + group[:1] * idle)
      lens = np.asarray([len(rest[i]) for i in group] + [1] * idle, np.int32)
      # Packed only when that drops half the group's slots (idle rows of a
      # call of few prompts), at one token count per group shape: each
      # packed count is one more program to compile.
      pack = S.pack_prompts(np.arange(P)[None, :] < lens[:, None], steps=2) \
          if pack_prefill and mesh is None else None
      state = _admit_jit(params, state, prefix, jnp.asarray(take, jnp.int32), jnp.asarray(tok),
                         jnp.asarray(lens),
                         None if pack is None else tuple(jnp.asarray(a) for a in pack),
                         keys[rows], jnp.asarray(np.r_[budgets[group], np.zeros(idle, np.int32)]),
                         **common, **static)
    need = max(int(idx[s]) for s in range(slots) if owner[s] >= 0) + block
    state = decode(params, decode_w, state, prefix, jnp.int32(block), **common, **static,
                   window=window_for(line, need))
    live, step, fin, idx = (np.array(a) for a in multihost.to_host(
        (state["live"], state["step"], state["finished"], state["idx"])))
    done = [s for s in range(slots) if owner[s] >= 0 and not live[s]]
    if done:
      t_all, l_all = (np.asarray(a) for a in multihost.to_host((state["toks"], state["lps"])))
      for s in done:
        i = owner[s]
        k = int(step[s])
        toks_out[i, :k], lps_out[i, :k] = t_all[s, :k], l_all[s, :k]
        lengths[i], finished[i] = k, bool(fin[s])
        owner[s] = -1
        free.append(s)
        if on_done is not None:
          on_done(i)
      free.sort()
    if not waiting and slots // 2 >= max(d, MIN_SLOTS) and slots // 2 % d == 0:
      busy = [s for s in range(slots) if owner[s] >= 0]
      if 0 < len(busy) <= slots // 2:
        keep = busy + [s for s in range(slots) if owner[s] < 0][:slots // 2 - len(busy)]
        state = _compact_jit(state, jnp.asarray(keep, jnp.int32), cfg=cfg, mesh=mesh)
        owner = [owner[s] for s in keep]
        idx = idx[np.asarray(keep)]
        slots //= 2
        free = [s for s in range(slots) if owner[s] < 0]
        decode_w, decode = decoder(slots)
    if between_blocks is not None:
      between_blocks()
  return S.SampleOutput(toks_out, lps_out, lengths, finished)

"""Text in, text out: `generate` completions and `score` continuations in batches.

Both sort requests by length so that batches hold similar lengths, pad each
batch to one of at most `max_buckets` lengths on `bucket_length`'s grid (chosen
to minimise padding), and keep the batch size fixed, so a long run compiles a
handful of times. Results come back in the caller's order.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import logging
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from cai_jax import models
from cai_jax import interrupts, multihost
from cai_jax import sharding as sharding_lib
from cai_jax import text as text_lib
from cai_jax.text import conversation
from cai_jax.sampling import engine
from cai_jax.sampling import stops as stops_lib
from cai_jax.sampling.sampler import TRACE_COUNTS, PromptTooLongError, bucket_length
from cai_jax.utils import InputError


@dataclasses.dataclass
class Completion:
  text: str                  # decoded completion, cut before the first stop string / EOS
  tokens: np.ndarray         # int32 generated ids, including the EOS / stop tokens
  logprobs: np.ndarray       # float32 log-prob of each token under the T=1 distribution
  finished: bool             # stopped on EOS or a stop string (not on max_new_tokens)
  finish_reason: str         # "eos" | "stop" | "length"
  prompt_tokens: np.ndarray  # int32 prompt ids as fed to the model (after truncation)


def encode_prompt(tokenizer, text: str) -> list:
  """Prompt ids with BOS as the tokenizer adds it (`text.conversation.encode_text`)."""
  return conversation.encode_text(tokenizer, text)


def completion_text(tokenizer, tokens, finished: bool, eos_ids: Sequence[int],
                    stop_strings: Sequence[str]) -> tuple[str, str]:
  """(text, finish reason) of sampled tokens: the EOS dropped, cut before the first
  stop string. Every consumer of samples (stages, PPO's reward) reads them so."""
  toks = list(int(t) for t in tokens)
  reason, body = "length", toks
  if finished and toks:
    reason = "eos" if toks[-1] in eos_ids else "stop"
    if reason == "eos":
      body = toks[:-1]
  txt = tokenizer.decode(body, skip_special_tokens=False, clean_up_tokenization_spaces=False)
  txt, found = stops_lib.trim_at_stop(txt, stop_strings)
  if found and reason == "length":
    reason = "stop"  # a stop the byte tables could not see (decoder-specific text)
  return txt, reason


def choose_buckets(needs: Sequence[int], max_buckets: int) -> list:
  """Padded length per batch: at most `max_buckets` distinct grid values.

  needs[i] is the longest request of batch i. Dynamic programming over the
  sorted distinct needs minimises the total padded length.
  """
  need_b = [bucket_length(n) for n in needs]
  vals = sorted(set(need_b))
  count = collections.Counter(need_b)
  if len(vals) <= max_buckets:
    return need_b
  # cost[j][k]: least total length covering vals[:j+1] with k buckets, the last at vals[j].
  n = len(vals)
  inf = float("inf")
  cost = [[inf] * (max_buckets + 1) for _ in range(n)]
  back = [[-1] * (max_buckets + 1) for _ in range(n)]
  prefix = [0]
  for v in vals:
    prefix.append(prefix[-1] + count[v])
  for j in range(n):
    cost[j][1] = vals[j] * prefix[j + 1]
    for k in range(2, max_buckets + 1):
      for i in range(j):
        c = cost[i][k - 1] + vals[j] * (prefix[j + 1] - prefix[i + 1])
        if c < cost[j][k]:
          cost[j][k], back[j][k] = c, i
  k = min(range(1, max_buckets + 1), key=lambda kk: cost[n - 1][kk])
  chosen, j = [], n - 1
  while j >= 0 and k >= 1:
    chosen.append(vals[j])
    j, k = back[j][k], k - 1
  chosen.sort()
  return [min(c for c in chosen if c >= v) for v in need_b]


def fit_batch_size(n: int, batch_size: int, divisor: int = 1) -> int:
  """Rows per compiled batch for a call of n requests.

  A call that fits in one batch runs at the next power of two >= n (rounded up
  to the mesh's batch divisor) instead of padding to the full `batch_size`:
  a chunk of 5 long prompts then costs 8 rows of prefill, not 16. Larger
  calls keep `batch_size` for every batch, so they compile one shape.
  """
  b = -(-int(batch_size) // divisor) * divisor
  if 0 < n < b:
    b = min(b, 1 << (int(n) - 1).bit_length())
    b = -(-b // divisor) * divisor
  return b


def _batches(order: np.ndarray, batch_size: int):
  return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def left_pad(rows: Sequence[Sequence[int]], pad_id: int = 0, length: Optional[int] = None,
             n_rows: Optional[int] = None):
  """(tokens, mask) of token lists left-padded to `length` (default: the
  longest); rows past len(rows) up to `n_rows` are filler holding one pad."""
  length = max(len(r) for r in rows) if length is None else length
  n_rows = len(rows) if n_rows is None else n_rows
  t = np.full((n_rows, length), pad_id, np.int32)
  m = np.zeros((n_rows, length), bool)
  for r, ids in enumerate(rows):
    if len(ids):
      t[r, length - len(ids):] = ids
      m[r, length - len(ids):] = True
  m[len(rows):, -1] = True  # filler rows hold one pad token
  return t, m


def eos_ids_of(cfg, tokenizer) -> tuple:
  ids = {cfg.eos_token_id, getattr(tokenizer, "eos_token_id", None)}
  return tuple(sorted(int(i) for i in ids if i is not None))


def generate(cfg, params, tokenizer, prompts, *, fmt: str = "chat", max_new_tokens: int = 128,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             greedy: bool = False, stop: Optional[Sequence[str]] = None, seed: int = 0,
             keys=None, batch_size: int = 16, mesh=None, progress: bool = True,
             truncate_long_prompts: bool = False, desc: str = "sampling",
             eos_ids: Optional[Sequence[int]] = None) -> list:
  """Completions for rendered prompt strings or message lists, in input order.

  Runs the continuous-batching engine (`sampling.engine`) with `batch_size`
  decode slots. stop: stop strings (default: `text.stop_strings(fmt,
  tokenizer)`); they are detected exactly inside the compiled loop and cut
  from `.text`. keys: one PRNG key per prompt (default: prompt i gets
  `sampler.row_keys(PRNGKey(seed), i)`). A prompt's completion depends on its
  text and key only, not on batch_size or on the other prompts of the call.
  """
  if batch_size < 1:
    raise InputError(f"generate: batch_size={batch_size} must be >= 1")
  texts = [p if isinstance(p, str) else text_lib.render(p, fmt, tokenizer) for p in prompts]
  ids = [encode_prompt(tokenizer, t) for t in texts]
  limit = cfg.max_position_embeddings - max_new_tokens
  if limit < 1:
    raise InputError(f"generate: max_new_tokens={max_new_tokens} leaves no room for a prompt "
                     f"in the context of {cfg.max_position_embeddings}; lower max_new_tokens")
  for i, x in enumerate(ids):
    if not x:
      raise InputError(f"generate: prompt {i} is empty; give it some text")
    if len(x) > limit:
      if not truncate_long_prompts:
        raise PromptTooLongError(
            f"generate: prompt {i} has {len(x)} tokens but the context of "
            f"{cfg.max_position_embeddings} leaves {limit} with max_new_tokens={max_new_tokens}; "
            "shorten it, lower max_new_tokens or set truncate_long_prompts=True")
      logging.warning("generate: prompt %d has %d tokens; keeping its last %d", i, len(x), limit)
      ids[i] = x[-limit:]
  stop_strings = list(text_lib.stop_strings(fmt, tokenizer) if stop is None else stop)
  matcher = stops_lib.from_strings(tokenizer, stop_strings, cfg.vocab_size)
  eos = eos_ids_of(cfg, tokenizer) if eos_ids is None else tuple(eos_ids)
  if mesh is not None:
    params = sharding_lib.shard_params(params, cfg, mesh)
  pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
  bar = tqdm.tqdm(total=len(ids), desc=desc, disable=not progress, unit="prompt")
  try:
    out = engine.generate_tokens(
        cfg, params, ids, jax.random.PRNGKey(seed) if keys is None else keys,
        max_new_tokens=max_new_tokens, slots=batch_size, temperature=temperature, top_k=top_k,
        top_p=top_p, greedy=greedy, eos_ids=eos, stop_seqs=matcher, pad_id=pad_id, mesh=mesh,
        on_done=lambda i: bar.update(1),
        between_blocks=lambda: interrupts.check(f"{desc}, {bar.n} of {len(ids)} done"))
  finally:
    bar.close()
  results = []
  for j in range(len(ids)):
    n = int(out.lengths_B[j])
    toks = out.tokens_BxN[j, :n].copy()
    txt, reason = completion_text(tokenizer, toks, bool(out.finished_B[j]), eos, stop_strings)
    results.append(Completion(text=txt, tokens=toks, logprobs=out.logprobs_BxN[j, :n].copy(),
                              finished=reason != "length", finish_reason=reason,
                              prompt_tokens=np.asarray(ids[j], np.int32)))
  return results


@functools.partial(jax.jit, static_argnames=("cfg", "cont_len"))
def _score_jit(params, tokens_BxL, mask_BxL, *, cfg, cont_len):
  """Log-probs of the last `cont_len` tokens of each row given what precedes them."""
  TRACE_COUNTS["score"] += 1
  L = tokens_BxL.shape[1]
  C = cont_len
  out = models.forward(cfg, params, tokens_BxL, models.positions_from_mask(mask_BxL),
                       mask_BxL, heads=())
  h_BxCxD = out["hidden"][:, L - C - 1:L - 1]
  target_BxC = tokens_BxL[:, L - C:]
  w = models.lm_head_weight(cfg, params).astype(cfg.jnp_dtype)

  # One row at a time keeps the C x V logits small for long continuations.
  def row(args):
    h_CxD, t_C = args
    logits = jnp.einsum("cd,dv->cv", h_CxD, w, preferred_element_type=jnp.float32)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, t_C[:, None], 1)[:, 0]

  return jax.lax.map(row, (h_BxCxD, target_BxC))


def score_tokens(cfg, params, prompt_ids, cont_ids, *, batch_size: int = 16, mesh=None,
                 pad_id: int = 0, progress: bool = False, max_buckets: int = 4) -> list:
  """Per-token log-probs (float32 arrays) of each continuation after its prompt."""
  if len(prompt_ids) != len(cont_ids):
    raise InputError(f"score: {len(prompt_ids)} prompts but {len(cont_ids)} continuations; "
                     "pass one continuation per prompt")
  seqs = []
  for i, (p, c) in enumerate(zip(prompt_ids, cont_ids)):
    p, c = list(p), list(c)
    if not p:
      raise InputError(f"score: prompt {i} is empty; a continuation needs a prompt to follow")
    if len(p) + len(c) > cfg.max_position_embeddings:
      raise PromptTooLongError(
          f"score: request {i} has {len(p) + len(c)} tokens, more than the context of "
          f"{cfg.max_position_embeddings}; shorten the prompt or the continuation")
    seqs.append((p, c))
  d = 1
  if mesh is not None:
    d = sharding_lib.batch_divisor(mesh)
    params = sharding_lib.shard_params(params, cfg, mesh)
  results: list = [np.zeros((0,), np.float32)] * len(seqs)
  todo = [i for i, (_, c) in enumerate(seqs) if c]
  batch_size = fit_batch_size(len(todo), batch_size, d)
  order = np.asarray(sorted(todo, key=lambda i: len(seqs[i][0]) + len(seqs[i][1])), np.int64)
  batches = _batches(order, batch_size)
  lens = choose_buckets([max(len(seqs[j][0]) + len(seqs[j][1]) for j in b) for b in batches],
                        max_buckets)
  for rows, L in tqdm.tqdm(list(zip(batches, lens)), desc="scoring", disable=not progress):
    interrupts.check("scoring")
    C = max(8, 1 << (max(len(seqs[j][1]) for j in rows) - 1).bit_length())
    L = bucket_length(max(L, C + 1))
    tokens, mask = left_pad([seqs[j][0] + seqs[j][1] for j in rows], pad_id, L, batch_size)
    t_in, m_in = jnp.asarray(tokens), jnp.asarray(mask)
    if mesh is not None:
      t_in, m_in = sharding_lib.shard_batch((tokens, mask), mesh)
    # multihost.to_host: with a multi-host mesh the result spans every host.
    lp = np.asarray(multihost.to_host(_score_jit(params, t_in, m_in, cfg=cfg, cont_len=C)))
    for r, j in enumerate(rows):
      n = len(seqs[j][1])
      results[j] = lp[r, C - n:].astype(np.float32)
  return results


def score(cfg, params, tokenizer, prompts: Sequence[str], continuations: Sequence[str], *,
          batch_size: int = 16, mesh=None, progress: bool = False) -> list:
  """Per-token log-probs of each continuation string after its prompt string."""
  p_ids = [encode_prompt(tokenizer, p) for p in prompts]
  c_ids = [list(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in continuations]
  pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
  return score_tokens(cfg, params, p_ids, c_ids, batch_size=batch_size, mesh=mesh,
                      pad_id=pad_id, progress=progress)


def generation_mesh(config, batch_size: int):
  """(mesh, sampler batch size) for a generation stage (revise, label).

  One process: the config's mesh and `batch_size` as given (unchanged
  behaviour). Several processes: the stages deal whole chunks to hosts, so each
  host samples on a mesh of its own devices (`sharding_lib.local_mesh_from_config`),
  with the batch size rounded up to the global mesh's batch divisor exactly as
  the single-process sampler rounds it. Same batches, same per-batch random
  streams: a chunk's records do not depend on the host that made it, and equal
  a single-process run's wherever the float numerics agree. Each device holds
  more rows than on the global mesh; XLA may round a one-row matmul differently
  from a several-row one, so a near-tie in sampling can then pick another token,
  as a different config.mesh on one host can.

  Small calls: `sampling.generate` shrinks a call of n < batch_size prompts to
  the next power of two rounded up to the *passed* mesh's batch divisor, so a
  host may pad fewer rows than a single process would. Every row samples from
  its own key (fold_in of its row index), so that padding does not change the
  real rows' random streams; only the float-rounding caveat above applies.
  """
  mesh = sharding_lib.mesh_from_config(config)
  if jax.process_count() == 1:
    return mesh, int(batch_size)
  d = sharding_lib.batch_divisor(mesh)
  rounded = -(-int(batch_size) // d) * d
  local = sharding_lib.local_mesh_from_config(config)
  if rounded % sharding_lib.batch_divisor(local):
    logging.warning("generation: sampler batch %d does not divide over the local mesh %s; "
                    "records may differ from a single-process run", rounded,
                    dict(local.shape))
  return local, rounded


def group_by_shape(keys: Sequence, max_tokens: int, length_of) -> list[list[int]]:
  """Indices grouped by shape key, each group's padded tokens <= max_tokens."""
  by_key: dict = {}
  for i, k in enumerate(keys):
    by_key.setdefault(k, []).append(i)
  out = []
  for k, idx in by_key.items():
    # A power of two, so that padding a partial group up to one stays within it.
    per = 1 << max(0, (max_tokens // max(1, length_of(k))).bit_length() - 1)
    out.extend(idx[j:j + per] for j in range(0, len(idx), per))
  return out


def scalar_scores(cfg, params, transcript_ids: Sequence[Sequence[int]], *,
                       max_tokens: int = 8192, pad_id: int = 0,
                       progress=None) -> np.ndarray:
  """Scalar-head output at the last token of each id list: a PM's score of each
  conversation encoded by `text.conversation` (whose last token is where it is read);
  n x A for a PM with a head per axis (cfg.score_labels)."""
  keys = [bucket_length(len(t)) for t in transcript_ids]
  out = np.zeros((len(transcript_ids),) + ((len(cfg.score_labels),) if cfg.score_labels else ()),
                 np.float64)
  for idx in group_by_shape(keys, max_tokens, lambda k: k):
    L = keys[idx[0]]
    toks = np.full((len(idx), L), pad_id, np.int32)
    mask = np.zeros((len(idx), L), bool)
    for b, i in enumerate(idx):
      t = transcript_ids[i]
      toks[b, L - len(t):] = t
      mask[b, L - len(t):] = True
    r = models.reward(cfg, params, jnp.asarray(toks), jnp.asarray(mask))
    out[idx] = np.asarray(multihost.to_host(r), np.float64)
    if progress is not None:
      progress(len(idx))
  return out


def combine_axes(scores, weights=None) -> np.ndarray:
  """One score per row from a PM with a head per axis (n x A): the weighted sum of
  the axes (equal weights 1/A by default); one-dimensional scores are returned as they are."""
  s = np.asarray(scores)
  if s.ndim == 1:
    return s
  w = np.full(s.shape[1], 1.0 / s.shape[1]) if weights is None else np.asarray(weights, s.dtype)
  return s @ w


def pm_scores(cfg, params, encoder, prompts: Sequence, responses: Sequence[str], *,
              max_len: int = 512, max_tokens: int = 8192) -> np.ndarray:
  """The preference model's score of each (prompt, response) conversation, read where
  the PM stage trains it: the last token of `encoder.conversation(...)`."""
  ids = [encoder.conversation(p, r, max_len=max_len).ids for p, r in zip(prompts, responses)]
  pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
  return scalar_scores(cfg, params, ids, pad_id=pad, max_tokens=max_tokens)

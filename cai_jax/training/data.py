"""Input pipeline: records -> token ids + loss masks -> fixed-shape numpy batches.

Examples are tokenised by the one conversation encoder (`text.conversation`):
SFT examples are (prompt messages, response) pairs whose loss mask marks the
response tokens only. Rows are padded on
the right to a fixed length, or packed (several examples per row, positions
restarting and attention kept within each example). Preference examples are
(prompt, response A, response B, p_A) pairs. `ShuffledIndex` gives a
deterministic, checkpointable order over examples (its state is a small dict).
"""
from __future__ import annotations

import dataclasses
from typing import Iterator, Optional, Sequence

import numpy as np



@dataclasses.dataclass
class SFTExample:
  tokens: np.ndarray     # int32 [n]: prompt then response ids
  loss_mask: np.ndarray  # bool [n]: True on response tokens (the ones to predict)


@dataclasses.dataclass
class PairExample:
  tokens_a: np.ndarray   # int32 prompt + response A (truncated on the left)
  tokens_b: np.ndarray
  p_a: float             # probability that A is the better response
  # Per-axis labels (a PM with a head per axis): P(A better) on each axis, and 1 where
  # the axis is labelled (human helpfulness pairs label one axis), else None.
  p_axes: Optional[np.ndarray] = None
  w_axes: Optional[np.ndarray] = None


def sft_example(encoder, prompt, response: str, max_len: int) -> SFTExample:
  """Prompt + response ids (`text.conversation`) with a response-only loss mask, at
  most max_len+1 ids (inputs and next-token targets of one row). Long examples keep
  the end of the prompt and the start of the response."""
  e = encoder.conversation(prompt, response, max_len=max_len + 1, keep="response")
  return SFTExample(e.ids, e.loss_mask)


def pair_example(encoder, prompt, response_a: str, response_b: str, p_a: float,
                 max_len: int) -> PairExample:
  """Both conversations as the encoder writes them; longer ones keep their end,
  where the preference model reads its score."""
  a = encoder.conversation(prompt, response_a, max_len=max_len)
  b = encoder.conversation(prompt, response_b, max_len=max_len)
  return PairExample(a.ids, b.ids, float(p_a))


# ------------------------------------------------------------------ batching
def pack_sft(examples: Sequence[SFTExample], max_len: int) -> list[list[int]]:
  """Greedy first-fit packing of example indices into rows of max_len+1 ids."""
  rows, used = [], []
  for i, ex in enumerate(examples):
    n = len(ex.tokens)
    for r, u in enumerate(used):
      if u + n <= max_len + 1:
        rows[r].append(i)
        used[r] += n
        break
    else:
      rows.append([i])
      used.append(n)
  return rows


def sft_batch(examples: Sequence[SFTExample], rows: Sequence[Sequence[int]], max_len: int,
              pad_id: int, packed: bool = False) -> dict:
  """Numpy batch for the SFT loss from rows (lists of example indices).

  tokens_BxL are inputs, targets_BxL the next ids; loss_mask_BxL marks targets
  that are response tokens. Packed rows carry segment_ids_BxL (0 = padding)
  and positions_BxL restarting at each example.
  """
  B, L = len(rows), max_len
  seq = np.full((B, L + 1), pad_id, np.int32)
  lm = np.zeros((B, L + 1), bool)
  seg = np.zeros((B, L + 1), np.int32)
  pos = np.zeros((B, L + 1), np.int32)
  for b, row in enumerate(rows):
    o = 0
    for s, i in enumerate(row, 1):
      ex = examples[i]
      n = min(len(ex.tokens), L + 1 - o)
      seq[b, o:o + n] = ex.tokens[:n]
      lm[b, o:o + n] = ex.loss_mask[:n]
      seg[b, o:o + n] = s
      pos[b, o:o + n] = np.arange(n)
      o += n
  out = {"tokens_BxL": seq[:, :-1], "targets_BxL": seq[:, 1:],
         # A target counts when it is a response token of the same example.
         "loss_mask_BxL": (lm[:, 1:] & (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
                           ).astype(np.float32),
         "mask_BxL": seg[:, :-1] > 0}
  if packed:
    out["segment_ids_BxL"] = seg[:, :-1]
    out["positions_BxL"] = pos[:, :-1]
  return out


def pair_batch(pairs: Sequence[PairExample], max_len: int, pad_id: int) -> dict:
  """Right-padded A and B sequences plus soft targets p_B."""
  B = len(pairs)
  ta = np.full((B, max_len), pad_id, np.int32)
  tb = np.full((B, max_len), pad_id, np.int32)
  ma = np.zeros((B, max_len), bool)
  mb = np.zeros((B, max_len), bool)
  for i, pr in enumerate(pairs):
    ta[i, :len(pr.tokens_a)] = pr.tokens_a
    ma[i, :len(pr.tokens_a)] = True
    tb[i, :len(pr.tokens_b)] = pr.tokens_b
    mb[i, :len(pr.tokens_b)] = True
  out = {"tokens_a_BxL": ta, "mask_a_BxL": ma, "tokens_b_BxL": tb, "mask_b_BxL": mb,
         "p_B": np.asarray([p.p_a for p in pairs], np.float32)}
  if pairs and pairs[0].p_axes is not None:
    out["p_BxA"] = np.stack([p.p_axes for p in pairs]).astype(np.float32)
    out["w_BxA"] = np.stack([p.w_axes for p in pairs]).astype(np.float32)
  return out


@dataclasses.dataclass
class DPOPair:
  a: SFTExample          # prompt + response A, loss mask on A's tokens
  b: SFTExample
  p_a: float             # probability that A is the better response
  ref_a: float = 0.0     # reference model's log π_ref(A | prompt), filled before training
  ref_b: float = 0.0


def dpo_pair(encoder, prompt, response_a: str, response_b: str, p_a: float,
             max_len: int) -> DPOPair:
  """Both responses encoded as SFT examples are (the response's tokens carry the
  loss mask), so a response's log-probability is read exactly where SFT trains it."""
  return DPOPair(sft_example(encoder, prompt, response_a, max_len),
                 sft_example(encoder, prompt, response_b, max_len), float(p_a))


def dpo_batch(pairs: Sequence[DPOPair], max_len: int, pad_id: int) -> dict:
  """Right-padded A and B rows (inputs, next-token targets, response masks), the
  labels p_B and the stored reference log-probs ref_a_B / ref_b_B."""
  out = {}
  for side in ("a", "b"):
    b = sft_batch([getattr(p, side) for p in pairs], [[i] for i in range(len(pairs))],
                  max_len, pad_id)
    out.update({k.replace("_BxL", f"_{side}_BxL"): v for k, v in b.items()})
  out["p_B"] = np.asarray([p.p_a for p in pairs], np.float32)
  out["ref_a_B"] = np.asarray([p.ref_a for p in pairs], np.float32)
  out["ref_b_B"] = np.asarray([p.ref_b for p in pairs], np.float32)
  return out


# ------------------------------------------------------------------ ordering
def split_eval(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Deterministic (train, eval) index split."""
  perm = np.random.default_rng([seed, 1234]).permutation(n)
  k = int(round(n * fraction)) if fraction > 0 else 0
  k = min(k, n - 1)
  return np.sort(perm[k:]), np.sort(perm[:k])



class ShuffledIndex:
  """Deterministic epoch-wise shuffled batches of indices with a JSON state.

  The permutation of epoch e depends only on (seed, e), so restoring
  {"epoch", "position"} resumes the exact order. Incomplete final batches are
  dropped (fixed shapes keep one compiled step).
  """

  def __init__(self, num_examples: int, batch_size: int, seed: int, shuffle: bool = True):
    if num_examples < batch_size:
      raise ValueError(f"{num_examples} examples cannot fill one batch of {batch_size}")
    self.n, self.batch_size, self.seed, self.shuffle = num_examples, batch_size, seed, shuffle
    self.epoch, self.position = 0, 0

  @property
  def batches_per_epoch(self) -> int:
    return self.n // self.batch_size

  def _perm(self, epoch: int) -> np.ndarray:
    if not self.shuffle:
      return np.arange(self.n)
    return np.random.default_rng([self.seed, epoch]).permutation(self.n)

  def __iter__(self) -> Iterator[np.ndarray]:
    return self

  def __next__(self) -> np.ndarray:
    if self.position >= self.batches_per_epoch:
      self.epoch, self.position = self.epoch + 1, 0
    p = self.position * self.batch_size
    idx = self._perm(self.epoch)[p:p + self.batch_size]
    self.position += 1
    return idx

  def get_state(self) -> dict:
    return {"epoch": int(self.epoch), "position": int(self.position), "seed": int(self.seed),
            "num_examples": int(self.n), "batch_size": int(self.batch_size)}

  def set_state(self, state: dict) -> None:
    for k in ("seed", "num_examples", "batch_size"):
      if k in state and int(state[k]) != int(getattr(self, {"num_examples": "n"}.get(k, k))):
        raise ValueError(f"iterator state has {k}={state[k]}, this run has "
                         f"{getattr(self, {'num_examples': 'n'}.get(k, k))}")
    self.epoch, self.position = int(state["epoch"]), int(state["position"])


class BatchIterator:
  """ShuffledIndex + a function turning index arrays into numpy batches."""

  def __init__(self, index: ShuffledIndex, make_batch):
    self.index, self.make_batch = index, make_batch

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    return self.make_batch(next(self.index))

  def get_state(self) -> dict:
    return self.index.get_state()

  def set_state(self, state: dict) -> None:
    self.index.set_state(state)


def segment_attention_mask(segment_ids_BxL):
  """BxLxL: query and key in the same (non-padding) segment (jnp or np)."""
  import jax.numpy as jnp
  s = segment_ids_BxL
  return (s[:, :, None] == s[:, None, :]) & (s[:, None, :] > 0)

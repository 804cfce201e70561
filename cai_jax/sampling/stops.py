"""Stop detection on token ids inside the compiled decode loop.

A stop string such as "\\n\\nHuman:" can be produced by many different token
sequences ("\\n\\n" + "Human" + ":", "\\n" + "\\nHuman:", ...), so matching a few
tokenisations of it would miss some. Instead we build an Aho-Corasick automaton
over the stop strings' bytes and fold every token's bytes through it ahead of
time. The result is one table `next_SxV` (automaton state x token id -> next
state, or -1 when the token completes a stop string), so the loop advances each
row with one gather per step and detects a stop string exactly when its last
byte is generated, however it was tokenised.

The same tables can be built from stop token-id sequences (automaton over the
token alphabet) for callers that work with ids only.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Sequence

import numpy as np

# Pad the number of automaton states so that similar stop sets share a compiled loop.
_STATE_MULTIPLE = 8


@dataclasses.dataclass(frozen=True, eq=False)
class StopMatcher:
  """Transition table of a stop automaton over token ids.

  next_SxV[s, t] is the state after token t from state s, or -1 when t
  completes a stop sequence. State 0 is the start state.
  """
  next_SxV: np.ndarray
  strings: tuple = ()

  @property
  def empty(self) -> bool:
    return not bool((self.next_SxV < 0).any())


def _aho_corasick(patterns: Sequence[Sequence[int]], alphabet: int):
  """(goto_SxA int32, accept_S bool) for the patterns over range(alphabet)."""
  children: list[dict] = [{}]
  accept = [False]
  for pat in patterns:
    s = 0
    for a in pat:
      if a not in children[s]:
        children.append({})
        accept.append(False)
        children[s][a] = len(children) - 1
      s = children[s][a]
    accept[s] = True
  n = len(children)
  goto = np.zeros((n, alphabet), np.int32)
  fail = np.zeros(n, np.int32)
  accept_arr = np.array(accept, bool)
  queue = collections.deque()
  for a, c in children[0].items():
    goto[0, a] = c
    queue.append(c)
  while queue:
    s = queue.popleft()
    accept_arr[s] |= accept_arr[fail[s]]
    goto[s] = goto[fail[s]]
    for a, c in children[s].items():
      fail[c] = goto[fail[s], a]
      goto[s, a] = c
      queue.append(c)
  return goto, accept_arr


def _pad_states(next_SxV: np.ndarray) -> np.ndarray:
  S, V = next_SxV.shape
  S_pad = -(-S // _STATE_MULTIPLE) * _STATE_MULTIPLE
  if S_pad == S:
    return next_SxV
  # Unreachable extra states; they return to the start state.
  return np.concatenate([next_SxV, np.zeros((S_pad - S, V), np.int32)], axis=0)


def from_token_seqs(seqs: Sequence[Sequence[int]], vocab_size: int) -> StopMatcher:
  """Matcher that fires when the generated ids end with any of `seqs`."""
  seqs = [tuple(int(t) for t in s) for s in seqs if len(s)]
  for s in seqs:
    if any(t < 0 or t >= vocab_size for t in s):
      raise ValueError(f"stop sequence {list(s)} has ids outside [0, {vocab_size})")
  goto, accept = _aho_corasick(seqs, vocab_size)
  nxt = np.where(accept[goto], -1, goto).astype(np.int32)
  return StopMatcher(_pad_states(nxt))


def _byte_decoder() -> dict:
  """Inverse of the GPT-2 byte-level alphabet (printable stand-ins for bytes)."""
  bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1)))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return {chr(c): b for b, c in zip(bs, cs)}


def token_bytes(tokenizer, vocab_size: int) -> list:
  """The bytes each token id contributes to decoded text (b"" for unused ids)."""
  pieces = tokenizer.convert_ids_to_tokens(list(range(min(len(tokenizer), vocab_size))))
  added = {i: t.content for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
  decoder_kind = ""
  backend = getattr(tokenizer, "backend_tokenizer", None)
  if backend is not None and backend.decoder is not None:
    decoder_kind = str(backend.decoder)
  byte_level = "ByteLevel" in decoder_kind
  inv = _byte_decoder() if byte_level else None
  out = []
  for i, p in enumerate(pieces):
    if i in added:
      out.append(added[i].encode("utf-8"))
    elif p is None:
      out.append(b"")
    elif byte_level and all(ch in inv for ch in p):
      out.append(bytes(inv[ch] for ch in p))
    elif len(p) == 6 and p.startswith("<0x") and p.endswith(">"):
      out.append(bytes([int(p[3:5], 16)]))  # SentencePiece byte fallback
    else:
      out.append(p.replace("\u2581", " ").encode("utf-8"))
  out += [b""] * (vocab_size - len(out))
  return out


def _fold_tokens(goto: np.ndarray, accept: np.ndarray, tok_bytes: list) -> np.ndarray:
  """Runs every token's bytes from every state; -1 where a stop completes."""
  S = goto.shape[0]
  V = len(tok_bytes)
  lens = np.array([len(b) for b in tok_bytes], np.int64)
  L = int(lens.max()) if V else 0
  mat = np.zeros((V, max(L, 1)), np.uint8)
  for i, b in enumerate(tok_bytes):
    if b:
      mat[i, :len(b)] = np.frombuffer(b, np.uint8)
  state = np.broadcast_to(np.arange(S, dtype=np.int32)[:, None], (S, V)).copy()
  hit = np.zeros((S, V), bool)
  for j in range(L):
    active = np.nonzero(lens > j)[0]
    ns = goto[state[:, active], mat[active, j][None, :]]
    state[:, active] = ns
    hit[:, active] |= accept[ns]
  return np.where(hit, -1, state).astype(np.int32)


@functools.lru_cache(maxsize=16)
def _from_strings_cached(ref, strings: tuple, vocab_size: int):
  tok_bytes = token_bytes(ref.obj, vocab_size)
  goto, accept = _aho_corasick([s.encode("utf-8") for s in strings], 256)
  return StopMatcher(_pad_states(_fold_tokens(goto, accept, tok_bytes)), strings)


class _Ref:
  """Hashes a tokenizer by identity for the lru_cache above."""

  def __init__(self, obj):
    self.obj = obj

  def __hash__(self):
    return id(self.obj)

  def __eq__(self, other):
    return isinstance(other, _Ref) and other.obj is self.obj


def from_strings(tokenizer, strings: Sequence[str], vocab_size: int) -> StopMatcher:
  """Matcher that fires on the token completing any stop string in the text."""
  strings = tuple(sorted({s for s in strings if s}))
  if not strings:
    return StopMatcher(np.zeros((_STATE_MULTIPLE, vocab_size), np.int32))
  return _from_strings_cached(_Ref(tokenizer), strings, vocab_size)


def trim_at_stop(text: str, strings: Sequence[str]) -> tuple[str, bool]:
  """Cuts text at the earliest stop string; returns (text, whether one was found)."""
  cut = -1
  for s in strings:
    if not s:
      continue
    k = text.find(s)
    if k >= 0 and (cut < 0 or k < cut):
      cut = k
  return (text, False) if cut < 0 else (text[:cut], True)

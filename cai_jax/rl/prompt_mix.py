"""A resumable stream of prompt batches mixing red-team and helpfulness prompts.

Each pool is visited in a fresh seeded permutation per epoch; a batch takes
`round(fraction * B)` red-team prompts and the rest helpfulness prompts. The
whole position (epoch and offset per pool) is a small dict, so a resumed run
draws exactly the batches the interrupted one would have.
"""
from __future__ import annotations

import numpy as np


class PromptMix:
  """Batches of (pool, index) draws over two pools of token-id prompts."""

  def __init__(self, red_team: list, helpful: list, fraction_red: float, batch_size: int,
               seed: int):
    if not red_team and not helpful:
      raise ValueError("ppo: no prompts to train on (both prompt sets are empty)")
    self.pools = {"red_team": red_team, "helpful": helpful}
    n_red = int(round(float(fraction_red) * batch_size))
    if not red_team:
      n_red = 0
    if not helpful:
      n_red = batch_size
    self.counts = {"red_team": n_red, "helpful": batch_size - n_red}
    self.seed = int(seed)
    self.pos = {k: {"epoch": 0, "offset": 0} for k in self.pools}

  def _perm(self, kind: str, epoch: int) -> np.ndarray:
    salt = 0 if kind == "red_team" else 1
    rng = np.random.default_rng([self.seed, salt, epoch])
    return rng.permutation(len(self.pools[kind]))

  def _take(self, kind: str, n: int) -> list:
    out = []
    pos = self.pos[kind]
    while len(out) < n:
      perm = self._perm(kind, pos["epoch"])
      take = min(n - len(out), len(perm) - pos["offset"])
      out.extend(self.pools[kind][i] for i in perm[pos["offset"]:pos["offset"] + take])
      pos["offset"] += take
      if pos["offset"] >= len(perm):
        pos["epoch"], pos["offset"] = pos["epoch"] + 1, 0
    return out

  def next_batch(self) -> list:
    """The next batch: red-team prompts first, then helpfulness prompts."""
    return self._take("red_team", self.counts["red_team"]) + \
        self._take("helpful", self.counts["helpful"])

  def state_dict(self) -> dict:
    return {k: dict(v) for k, v in self.pos.items()}

  def load_state_dict(self, d: dict) -> None:
    for k in self.pos:
      self.pos[k] = {"epoch": int(d[k]["epoch"]), "offset": int(d[k]["offset"])}


def left_pad(rows: list, length: int, pad_id: int):
  """(tokens_BxP int32, mask_BxP bool) with each row right-aligned."""
  toks = np.full((len(rows), length), pad_id, np.int32)
  mask = np.zeros((len(rows), length), bool)
  for i, r in enumerate(rows):
    r = list(r)[-length:]
    toks[i, length - len(r):] = r
    mask[i, length - len(r):] = True
  return toks, mask

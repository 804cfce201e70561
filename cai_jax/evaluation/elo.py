"""Elo ratings fitted by Bradley-Terry maximum likelihood, with confidence intervals.

A comparison (i, j, s) says player i scored s in [0, 1] against player j: 1 is a
win, 0 a loss, 0.5 a tie, anything between a soft outcome (a judge's probability
that i is better). The model is

    P(i beats j) = 1 / (1 + 10 ** ((R_j - R_i) / 400)),

the Elo convention the paper uses, so a 100-point gap means a 64% win rate. The
log-likelihood sum_k s_k log p_k + (1 - s_k) log(1 - p_k) is concave in R, so
Newton's method converges in a handful of steps. Ratings are only defined up to a
shift; we fix it by pinning the `anchor` player at 0 (or, with anchor=None, by
making the ratings sum to zero).

Intervals come either from the Fisher information (the inverse Hessian of the
negative log-likelihood, a normal approximation) or from a bootstrap over
comparisons. The test recovers known ratings from simulated games.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from cai_jax.utils import InputError

# d log-odds / d Elo: log-odds = (R_i - R_j) * ln(10) / 400.
ELO_SCALE = math.log(10.0) / 400.0
Z95 = 1.959963984540054


@dataclasses.dataclass
class EloResult:
  """Ratings per player with standard errors and 95% intervals (all in Elo)."""
  players: list[str]
  ratings: np.ndarray        # [P]
  stderr: np.ndarray         # [P], 0 for the anchor
  lower: np.ndarray          # [P] 95% interval
  upper: np.ndarray          # [P]
  num_comparisons: int
  method: str                # "fisher" | "bootstrap"

  def as_dict(self) -> dict:
    return {p: {"elo": float(r), "stderr": float(s), "lo": float(lo), "hi": float(hi)}
            for p, r, s, lo, hi in zip(self.players, self.ratings, self.stderr,
                                       self.lower, self.upper)}

  def __getitem__(self, player: str) -> float:
    return float(self.ratings[self.players.index(player)])


def win_probability(r_i, r_j):
  """P(i beats j) under the Elo model; broadcasts."""
  return 1.0 / (1.0 + np.power(10.0, (np.asarray(r_j) - np.asarray(r_i)) / 400.0))


def _index(players, comparisons):
  pos = {p: k for k, p in enumerate(players)}
  try:
    i = np.array([pos[c[0]] for c in comparisons], dtype=np.int64)
    j = np.array([pos[c[1]] for c in comparisons], dtype=np.int64)
  except KeyError as e:
    raise InputError(f"Elo comparisons name player {e.args[0]!r} not in the player list "
                     f"{list(players)}; add it to `players`") from None
  s = np.array([float(c[2]) for c in comparisons], dtype=np.float64)
  if np.any((s < 0) | (s > 1)) or not np.all(np.isfinite(s)):
    raise InputError("Elo comparison outcomes must lie in [0, 1] (1 = first player wins); "
                     "fix the outcome values")
  if np.any(i == j):
    raise InputError("an Elo comparison pits a player against itself; drop it")
  return i, j, s


def _fit(num_players, i, j, s, weights, anchor, prior, iters=100):
  """Newton's method on the penalised negative log-likelihood in log-odds units.

  Returns (theta [P] in log-odds units, Hessian [P, P]). `prior` is a small ridge
  on the ratings that keeps a player who won or lost everything finite.
  """
  theta = np.zeros(num_players)
  for _ in range(iters):
    d = theta[i] - theta[j]
    p = 1.0 / (1.0 + np.exp(-d))
    g_k = weights * (p - s)                       # d NLL / d d_k
    grad = np.bincount(i, g_k, num_players) - np.bincount(j, g_k, num_players)
    grad += prior * theta
    w_k = weights * p * (1.0 - p)
    hess = np.zeros((num_players, num_players))
    np.add.at(hess, (i, i), w_k)
    np.add.at(hess, (j, j), w_k)
    np.add.at(hess, (i, j), -w_k)
    np.add.at(hess, (j, i), -w_k)
    hess += prior * np.eye(num_players)
    step = _constrained_solve(hess, grad, anchor)
    theta -= step
    if np.max(np.abs(step)) < 1e-10:
      break
  return theta, hess


def _basis(num_players, anchor):
  """Columns spanning the ratings allowed by the gauge (anchor at 0 or sum zero)."""
  if anchor is None:
    # Orthonormal basis of {x : sum x = 0}.
    q, _ = np.linalg.qr(np.eye(num_players) - 1.0 / num_players)
    return q[:, :num_players - 1]
  keep = [k for k in range(num_players) if k != anchor]
  return np.eye(num_players)[:, keep]


def _constrained_solve(hess, grad, anchor):
  b = _basis(len(grad), anchor)
  step_reduced = np.linalg.solve(b.T @ hess @ b, b.T @ grad)
  return b @ step_reduced


def _covariance(hess, anchor):
  b = _basis(hess.shape[0], anchor)
  return b @ np.linalg.inv(b.T @ hess @ b) @ b.T


def fit_elo(comparisons: Sequence[tuple], players: Sequence[str] | None = None, *,
            anchor: str | None = None, method: str = "fisher", num_bootstrap: int = 200,
            seed: int = 0, prior: float = 1e-3, groups: Sequence | None = None) -> EloResult:
  """Fits Elo ratings to comparisons (player_i, player_j, score_of_i).

  Args:
    comparisons: iterable of (i, j, s) with s in [0, 1] (soft outcomes allowed).
    players: the player order of the result (default: order of first appearance).
    anchor: the player pinned at 0 Elo; None centres the ratings at mean 0.
    method: "fisher" (inverse Hessian, fast) or "bootstrap" (resample comparisons).
    prior: ridge strength, in log-odds units, keeping all-win players finite; its
      effect on ratings is O(prior / games played).
    groups: with method="bootstrap", one label per comparison (its prompt): whole
      groups are resampled, since comparisons on one prompt are not independent.
  """
  comparisons = list(comparisons)
  if not comparisons:
    raise InputError("no comparisons to fit Elo ratings to; run the judges first")
  if players is None:
    players = list(dict.fromkeys([c[0] for c in comparisons] + [c[1] for c in comparisons]))
  players = list(players)
  if anchor is not None and anchor not in players:
    raise InputError(f"Elo anchor {anchor!r} is not a player ({players})")
  i, j, s = _index(players, comparisons)
  a = None if anchor is None else players.index(anchor)
  weights = np.ones_like(s)
  theta, hess = _fit(len(players), i, j, s, weights, a, prior)
  ratings = theta / ELO_SCALE
  if method == "fisher":
    cov = _covariance(hess, a)
    stderr = np.sqrt(np.clip(np.diag(cov), 0.0, None)) / ELO_SCALE
    lower, upper = ratings - Z95 * stderr, ratings + Z95 * stderr
  elif method == "bootstrap":
    rng = np.random.default_rng(seed)
    n = len(s)
    if groups is None:
      gid = np.arange(n)
    else:
      if len(groups) != n:
        raise InputError(f"Elo bootstrap: {len(groups)} group labels for {n} comparisons")
      gid = np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)[1]
    num_groups = int(gid.max()) + 1
    draws = np.empty((num_bootstrap, len(players)))
    for b in range(num_bootstrap):
      picked = np.bincount(rng.integers(0, num_groups, num_groups), minlength=num_groups)
      counts = picked[gid].astype(np.float64)
      theta_b, _ = _fit(len(players), i, j, s, counts, a, prior)
      draws[b] = theta_b / ELO_SCALE
    stderr = draws.std(axis=0, ddof=1)
    lower, upper = np.percentile(draws, 2.5, axis=0), np.percentile(draws, 97.5, axis=0)
  else:
    raise InputError(f"unknown Elo interval method {method!r}; use 'fisher' or 'bootstrap'")
  return EloResult(players, ratings, stderr, lower, upper, len(s), method)

"""Elo fit: exact two-player maths, recovery of known ratings, interval coverage."""
import math

import numpy as np
import pytest

from cai_jax.evaluation import elo
from cai_jax.utils import InputError

TRUE = {"helpful": 0.0, "sl_cai": 120.0, "rl_cai": 260.0, "base": -150.0}
# Stated tolerance: with 24,000 simulated games among 4 players, every fitted
# rating lies within 20 Elo of the truth (the Fisher stderr is ~5 Elo here, so this is ~4 sigma).
TOLERANCE_ELO = 20.0


def _simulate(rng, ratings, n):
  names = list(ratings)
  out = []
  for _ in range(n):
    a, b = rng.choice(len(names), 2, replace=False)
    p = elo.win_probability(ratings[names[a]], ratings[names[b]])
    out.append((names[a], names[b], float(rng.random() < p)))
  return out


def test_two_players_closed_form():
  # MLE for two players with win fraction f: R_a - R_b = 400 log10(f / (1 - f)).
  comps = [("a", "b", 1.0)] * 30 + [("a", "b", 0.0)] * 10
  r = elo.fit_elo(comps, anchor="b", prior=0.0)
  assert r["a"] == pytest.approx(400 * math.log10(3.0), abs=1e-6)
  assert r["b"] == 0.0
  # Fisher stderr for the difference: 1 / sqrt(n p (1-p)) in log-odds units.
  se = 1.0 / math.sqrt(40 * 0.75 * 0.25) / elo.ELO_SCALE
  assert r.stderr[0] == pytest.approx(se, rel=1e-6)


def test_soft_outcomes_equal_fractional_wins():
  soft = elo.fit_elo([("a", "b", 0.8)] * 10, anchor="b", prior=0.0)
  hard = elo.fit_elo([("a", "b", 1.0)] * 8 + [("a", "b", 0.0)] * 2, anchor="b", prior=0.0)
  assert soft["a"] == pytest.approx(hard["a"], abs=1e-6)
  assert soft["a"] == pytest.approx(400 * math.log10(4.0), abs=1e-6)


def test_recovers_known_ratings():
  rng = np.random.default_rng(0)
  comps = _simulate(rng, TRUE, 24000)
  r = elo.fit_elo(comps, players=list(TRUE), anchor="helpful")
  err = np.abs(r.ratings - np.array(list(TRUE.values())))
  assert err.max() < TOLERANCE_ELO, (r.as_dict(), err)
  for k, name in enumerate(TRUE):
    assert r.lower[k] <= r.ratings[k] <= r.upper[k]
  # The ordering is right and the intervals of the extremes do not overlap.
  assert list(np.argsort(r.ratings)) == [3, 0, 1, 2]
  assert r.upper[3] < r.lower[2]


def test_fisher_intervals_cover_truth():
  # 95% intervals should contain the truth in roughly 95% of repetitions.
  rng = np.random.default_rng(1)
  hits = total = 0
  for _ in range(60):
    comps = _simulate(rng, TRUE, 800)
    r = elo.fit_elo(comps, players=list(TRUE), anchor="helpful")
    for k, t in enumerate(TRUE.values()):
      if k == 0:
        continue
      hits += r.lower[k] <= t <= r.upper[k]
      total += 1
  assert 0.88 <= hits / total <= 0.995, hits / total


def test_bootstrap_agrees_with_fisher():
  rng = np.random.default_rng(2)
  comps = _simulate(rng, TRUE, 3000)
  f = elo.fit_elo(comps, players=list(TRUE), anchor="helpful")
  b = elo.fit_elo(comps, players=list(TRUE), anchor="helpful", method="bootstrap",
                  num_bootstrap=100)
  np.testing.assert_allclose(b.ratings, f.ratings)
  np.testing.assert_allclose(b.stderr[1:], f.stderr[1:], rtol=0.35)


def test_centred_gauge_and_all_wins_finite():
  comps = [("a", "b", 1.0)] * 5 + [("b", "c", 0.5)] * 4
  r = elo.fit_elo(comps)
  assert abs(r.ratings.sum()) < 1e-6
  assert np.all(np.isfinite(r.ratings)) and r["a"] > r["b"]


def test_bad_input():
  with pytest.raises(InputError, match="in \\[0, 1\\]"):
    elo.fit_elo([("a", "b", 1.5)])
  with pytest.raises(InputError, match="not in the player list"):
    elo.fit_elo([("a", "z", 1.0)], players=["a", "b"])
  with pytest.raises(InputError, match="no comparisons"):
    elo.fit_elo([])

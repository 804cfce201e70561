"""Statistics the report states, against hand-computed values and simulations; the
sanity flags; Elo bootstrap intervals that cover the true ratings at the stated rate."""
import math

import numpy as np
import pytest

from cai_jax.evaluation import elo, stats


def test_wilson_interval_by_hand():
  # p = 0.62, n = 100, z = 1.96: centre (0.62 + 1.96^2/200) / (1 + 1.96^2/100).
  z = stats.Z95
  p, n = 0.62, 100
  d = 1 + z * z / n
  centre = (p + z * z / (2 * n)) / d
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
  got = stats.proportion_ci(62, 100)
  assert got[0] == 0.62
  assert got[1] == pytest.approx(centre - half, abs=1e-12)
  assert got[2] == pytest.approx(centre + half, abs=1e-12)
  assert got[1] == pytest.approx(0.5221, abs=1e-4) and got[2] == pytest.approx(0.7090, abs=1e-4)
  assert stats.proportion_ci(0, 5)[1] == 0.0 and stats.proportion_ci(5, 5)[2] == 1.0


def test_paired_difference_by_hand():
  new = [2.0, 3.5, 1.0, 4.0, 2.5]
  base = [1.0, 3.0, 1.5, 2.0, 2.0]
  d = np.array(new) - np.array(base)          # 1.0, 0.5, -0.5, 2.0, 0.5
  mean = d.sum() / 5                          # 0.7
  sd = math.sqrt(((d - mean) ** 2).sum() / 4)  # sqrt(3.3 / 4)
  t = mean / (sd / math.sqrt(5))
  got = stats.paired_difference(new, base)
  assert got["mean"] == pytest.approx(0.7, abs=1e-12)
  assert got["sd"] == pytest.approx(sd, abs=1e-12)
  assert got["t"] == pytest.approx(t, abs=1e-12)
  t975_4 = 2.7764451051977987                 # Student t, 4 degrees of freedom
  assert got["lo"] == pytest.approx(mean - t975_4 * sd / math.sqrt(5), abs=1e-9)
  assert got["hi"] == pytest.approx(mean + t975_4 * sd / math.sqrt(5), abs=1e-9)
  # Two-sided p for t = 1.7234 with 4 dof (tables: between 0.10 and 0.20).
  assert 0.10 < got["p"] < 0.20 and not stats.significant(got)
  assert stats.significant(stats.paired_difference([5, 6, 7, 8, 9.5], [1, 2, 3, 4, 5]))


def test_holm_by_hand():
  # Sorted p: 0.01, 0.02, 0.04, 0.30 -> x4, x3, x2, x1 = 0.04, 0.06, 0.08, 0.30 (monotone).
  assert stats.holm([0.04, 0.01, 0.30, 0.02]) == pytest.approx([0.08, 0.04, 0.30, 0.06])
  assert stats.holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped, monotone


def test_at_chance_flags():
  assert stats.at_chance(0.45, 0.70, 0.5)       # interval includes chance
  assert not stats.at_chance(0.55, 0.70, 0.5)
  assert stats.at_chance(float("nan"), float("nan"), 0.5)  # no evidence is no evidence


def test_elo_bootstrap_intervals_cover_simulated_ratings():
  """100 simulated tournaments between 3 players with known ratings: the bootstrap
  95% intervals (prompts resampled as groups) cover the truth about 95% of the time."""
  true = np.array([0.0, 120.0, -80.0])
  players = ["a", "b", "c"]
  rng = np.random.default_rng(0)
  covered, total = 0, 0
  for trial in range(100):
    comps, groups = [], []
    for prompt in range(40):
      for x in range(3):
        for y in range(x + 1, 3):
          p = elo.win_probability(true[x], true[y])
          comps.append((players[x], players[y], float(rng.random() < p)))
          groups.append(prompt)
    fit = elo.fit_elo(comps, players, anchor="a", method="bootstrap", num_bootstrap=100,
                      seed=trial, groups=groups)
    for k in (1, 2):
      total += 1
      covered += fit.lower[k] <= true[k] <= fit.upper[k]
  rate = covered / total
  assert 0.88 <= rate <= 0.995, rate

"""The statistics the report states: intervals for accuracies and means, paired
differences between snapshots, and whether a component is at chance.

  proportion_ci(62, 100)            -> (0.62, 0.522, 0.709)   Wilson 95% interval
  mean_ci([...])                    -> {"mean", "lo", "hi", "n", "sd"}   t interval
  paired_difference(new, base)      -> {"mean", "lo", "hi", "p", "n"}    paired t test
  holm([p1, p2, ...])               -> Holm-Bonferroni adjusted p-values
  at_chance(lo, hi, chance)         -> True when the 95% interval includes chance
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

Z95 = 1.959963984540054


def proportion_ci(k: float, n: int, z: float = Z95) -> tuple[float, float, float]:
  """(estimate, lower, upper) of a proportion k/n: the Wilson score interval, which
  stays inside [0, 1] and behaves at small n (a normal interval does not)."""
  if n <= 0:
    return float("nan"), float("nan"), float("nan")
  p = k / n
  d = 1 + z * z / n
  centre = (p + z * z / (2 * n)) / d
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
  return p, max(0.0, centre - half), min(1.0, centre + half)


def _t_quantile(dof: int) -> float:
  from scipy import stats
  return float(stats.t.ppf(0.975, dof))


def mean_ci(x: Sequence[float]) -> dict:
  """Mean with a 95% t interval (nan bounds for fewer than 2 values)."""
  x = np.asarray(x, np.float64)
  n = len(x)
  if n == 0:
    return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0,
            "sd": float("nan")}
  m = float(x.mean())
  if n < 2:
    return {"mean": m, "lo": float("nan"), "hi": float("nan"), "n": 1, "sd": float("nan")}
  sd = float(x.std(ddof=1))
  half = _t_quantile(n - 1) * sd / math.sqrt(n)
  return {"mean": m, "lo": m - half, "hi": m + half, "n": n, "sd": sd}


def paired_difference(new: Sequence[float], base: Sequence[float]) -> dict:
  """Mean of new - base over paired items (the same prompts), its 95% t interval and
  the two-sided paired t-test p-value."""
  from scipy import stats
  a, b = np.asarray(new, np.float64), np.asarray(base, np.float64)
  if a.shape != b.shape:
    raise ValueError(f"paired values differ in shape: {a.shape} vs {b.shape}")
  d = a - b
  out = mean_ci(d)
  n = len(d)
  if n < 2 or out["sd"] == 0 or not np.isfinite(out["sd"]):
    out["p"] = 1.0 if n < 2 or out["mean"] == 0 else 0.0
    return out
  t = out["mean"] / (out["sd"] / math.sqrt(n))
  out["p"] = float(2 * stats.t.sf(abs(t), n - 1))
  out["t"] = float(t)
  return out


def holm(ps: Sequence[float]) -> list[float]:
  """Holm-Bonferroni adjusted p-values: several snapshots x axes are tested at once,
  and one p < 0.05 among four tests is expected by chance alone."""
  ps = [float(p) for p in ps]
  order = sorted(range(len(ps)), key=lambda i: ps[i])
  out, running = [0.0] * len(ps), 0.0
  for rank, i in enumerate(order):
    running = max(running, min(1.0, (len(ps) - rank) * ps[i]))
    out[i] = running
  return out


def at_chance(lo: float, hi: float, chance: float) -> bool:
  """A measured rate whose 95% interval includes chance cannot be told from chance."""
  if not (np.isfinite(lo) and np.isfinite(hi)):
    return True
  return lo <= chance <= hi


def significant(diff: dict, alpha: float = 0.05) -> bool:
  return bool(np.isfinite(diff.get("p", float("nan"))) and diff["p"] < alpha)

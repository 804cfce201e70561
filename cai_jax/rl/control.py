"""Host-side controllers whose state is checkpointed with the run: the KL
coefficient β (fixed or adaptive) and the running reward normaliser.

Both are plain Python objects with `state_dict()` / `load_state_dict()` so a
resumed run continues with exactly the β and statistics it stopped with.
"""
from __future__ import annotations

import math

import numpy as np

from cai_jax.utils import InputError


class FixedKLController:
  """β never changes."""

  def __init__(self, beta: float):
    self.beta = float(beta)

  def update(self, kl: float, n_steps: int) -> float:
    return self.beta

  def state_dict(self) -> dict:
    return {"beta": self.beta}

  def load_state_dict(self, d: dict) -> None:
    self.beta = float(d["beta"])


class AdaptiveKLController:
  """Proportional controller on log β (Ziegler et al. 2019).

  e = clip(KL / target − 1, −0.2, 0.2);  β ← β · (1 + e · n_steps / horizon).
  KL is the mean per-sequence KL of the last rollout and n_steps the number
  of sequences in it, so `horizon` is measured in sequences.
  """

  def __init__(self, beta: float, target: float, horizon: float):
    if target <= 0 or horizon <= 0:
      raise ValueError(f"adaptive KL needs target > 0 and horizon > 0, got "
                       f"target={target}, horizon={horizon}")
    self.beta = float(beta)
    self.target = float(target)
    self.horizon = float(horizon)

  def update(self, kl: float, n_steps: int) -> float:
    if not math.isfinite(kl):
      return self.beta
    err = float(np.clip(kl / self.target - 1.0, -0.2, 0.2))
    self.beta *= 1.0 + err * n_steps / self.horizon
    return self.beta

  def state_dict(self) -> dict:
    return {"beta": self.beta, "target": self.target, "horizon": self.horizon}

  def load_state_dict(self, d: dict) -> None:
    self.beta = float(d["beta"])


def make_kl_controller(kind: str, beta: float, target: float = 6.0, horizon: float = 10000.0):
  if kind == "fixed":
    return FixedKLController(beta)
  if kind == "adaptive":
    return AdaptiveKLController(beta, target, horizon)
  raise ValueError(f"ppo.kl.kind must be 'fixed' or 'adaptive', got {kind!r}")


class RunningMeanStd:
  """Running mean and variance of scalar rewards (Chan et al. parallel update).

  `normalize` divides by the running std and, with `center`, subtracts the
  running mean; statistics include the batch being normalised.
  """

  def __init__(self, eps: float = 1e-8):
    self.count = 0
    self.mean = 0.0
    self.m2 = 0.0
    self.eps = eps

  @property
  def var(self) -> float:
    return self.m2 / self.count if self.count else 1.0

  def update(self, x) -> None:
    x = np.asarray(x, np.float64).reshape(-1)
    if x.size == 0:
      return
    n_b, mean_b = x.size, float(x.mean())
    m2_b = float(np.square(x - mean_b).sum())
    n = self.count + n_b
    delta = mean_b - self.mean
    self.mean += delta * n_b / n
    self.m2 += m2_b + delta * delta * self.count * n_b / n
    self.count = n

  def normalize(self, x, center: bool = True):
    x = np.asarray(x, np.float64)
    y = (x - self.mean) if center else x
    return (y / math.sqrt(self.var + self.eps)).astype(np.float32)

  def state_dict(self) -> dict:
    return {"count": self.count, "mean": self.mean, "m2": self.m2}

  def load_state_dict(self, d: dict) -> None:
    self.count = int(d["count"])
    self.mean = float(d["mean"])
    self.m2 = float(d["m2"])


class AxisWeights:
  """The RL reward of a PM with a head per axis: sum_a w_a (s_a - mean_a) / std_a,
  each axis standardised by its own running statistics (which include the batch),
  so that no axis dominates by the scale its head happened to learn."""

  def __init__(self, names, weights, eps: float = 1e-8):
    self.names = list(names)
    self.weights = np.asarray(weights, np.float64)
    self.stats = [RunningMeanStd(eps) for _ in self.names]

  def __call__(self, scores_BxA) -> np.ndarray:
    s = np.asarray(scores_BxA, np.float64)
    out = np.zeros(s.shape[0], np.float64)
    for j, st in enumerate(self.stats):
      st.update(s[:, j])
      out += self.weights[j] * st.normalize(s[:, j]).astype(np.float64)
    return out.astype(np.float32)

  def state_dict(self) -> dict:
    return {n: st.state_dict() for n, st in zip(self.names, self.stats)}

  def load_state_dict(self, d: dict) -> None:
    for n, st in zip(self.names, self.stats):
      st.load_state_dict(d[n])


def parse_axis_weights(text: str, names, field: str = "ppo.axis_weights") -> list:
  """"harm:1,helpfulness:0.5" -> one weight per name (unnamed axes 0); "" gives
  every axis 1/A."""
  names = list(names)
  if not str(text).strip():
    return [1.0 / len(names)] * len(names)
  got = {}
  for part in str(text).split(","):
    name, sep, w = part.partition(":")
    try:
      if not sep:
        raise ValueError
      got[name.strip()] = float(w)
    except ValueError:
      raise InputError(f"config.{field}={text!r}: write axis:weight pairs, e.g. "
                       f"{names[0]}:1,{names[-1]}:0.5") from None
  bad = sorted(set(got) - set(names))
  if bad:
    raise InputError(f"config.{field}: {bad} are not axes of the preference model "
                     f"({', '.join(names)})")
  return [got.get(n, 0.0) for n in names]

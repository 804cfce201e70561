"""Calibration of multiple-choice probabilities: expected calibration error and
a reliability diagram (PNG).

A model is calibrated when, among answers given with confidence c, a fraction
c is right. Confidences are binned into equal-width bins on [0, 1]:

  ECE = sum_b (n_b / n) * |accuracy_b - mean confidence_b|

  conf, right = top_label(probs_list, correct_list)
  ece = expected_calibration_error(conf, right)
  reliability_diagram(conf, right, "calibration.png", title="HarmfulVsEthical")
"""
from __future__ import annotations

import io
from typing import Sequence

import numpy as np

from cai_jax.utils import atomic_write_bytes


def top_label(probs_list: Sequence[np.ndarray], correct_list: Sequence[Sequence[bool]]):
  """(confidence of the chosen option, whether it is correct) per question."""
  conf = np.array([float(np.max(p)) for p in probs_list])
  right = np.array([bool(np.asarray(c)[int(np.argmax(p))])
                    for p, c in zip(probs_list, correct_list)])
  return conf, right


def all_options(probs_list: Sequence[np.ndarray], correct_list: Sequence[Sequence[bool]]):
  """(probability, correctness) of every option of every question."""
  conf = np.concatenate([np.asarray(p, np.float64) for p in probs_list])
  right = np.concatenate([np.asarray(c, bool) for c in correct_list])
  return conf, right


def calibration_bins(confidences, correct, num_bins: int = 10) -> dict:
  """Per equal-width bin: count, mean confidence, accuracy (NaN when empty)."""
  conf = np.asarray(confidences, np.float64)
  right = np.asarray(correct, np.float64)
  if conf.shape != right.shape or conf.ndim != 1:
    raise ValueError("confidences and correct must be 1-D and of equal length")
  if num_bins < 1:
    raise ValueError("num_bins must be >= 1")
  if conf.size and (conf.min() < 0 or conf.max() > 1):
    raise ValueError("confidences must lie in [0, 1]")
  # The right edge 1.0 belongs to the last bin.
  idx = np.minimum((conf * num_bins).astype(int), num_bins - 1)
  count = np.bincount(idx, minlength=num_bins)
  conf_sum = np.bincount(idx, weights=conf, minlength=num_bins)
  right_sum = np.bincount(idx, weights=right, minlength=num_bins)
  with np.errstate(invalid="ignore", divide="ignore"):
    mean_conf = np.where(count > 0, conf_sum / np.maximum(count, 1), np.nan)
    acc = np.where(count > 0, right_sum / np.maximum(count, 1), np.nan)
  return {"edges": np.linspace(0.0, 1.0, num_bins + 1), "count": count,
          "confidence": mean_conf, "accuracy": acc}


def expected_calibration_error(confidences, correct, num_bins: int = 10) -> float:
  b = calibration_bins(confidences, correct, num_bins)
  n = b["count"].sum()
  if n == 0:
    return float("nan")
  used = b["count"] > 0
  gaps = np.abs(b["accuracy"][used] - b["confidence"][used])
  return float(np.sum(b["count"][used] / n * gaps))


def reliability_diagram(confidences, correct, path: str, num_bins: int = 10,
                        title: str = "") -> float:
  """Writes a reliability diagram PNG to `path` (atomically); returns the ECE."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  b = calibration_bins(confidences, correct, num_bins)
  ece = expected_calibration_error(confidences, correct, num_bins)
  edges = b["edges"]
  centers = (edges[:-1] + edges[1:]) / 2
  width = edges[1] - edges[0]
  fig, (ax, axh) = plt.subplots(2, 1, figsize=(4.5, 5.5), sharex=True,
                                gridspec_kw={"height_ratios": [3, 1]})
  used = b["count"] > 0
  ax.bar(centers[used], b["accuracy"][used], width=width * 0.9, color="tab:blue",
         edgecolor="black", label="accuracy")
  ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
  ax.plot(b["confidence"][used], b["accuracy"][used], "o", color="tab:red", ms=4,
          label="bin at its mean confidence")
  ax.set_ylim(0, 1)
  ax.set_ylabel("accuracy")
  ax.set_title(f"{title}  ECE={ece:.3f}" if title else f"ECE={ece:.3f}")
  ax.legend(loc="upper left", fontsize=8)
  axh.bar(centers, b["count"], width=width * 0.9, color="gray")
  axh.set_xlabel("confidence")
  axh.set_ylabel("count")
  axh.set_xlim(0, 1)
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=100)
  plt.close(fig)
  atomic_write_bytes(path, buf.getvalue())
  return ece

"""PNG plots for the report: the paper's figures drawn from a run's numbers.

Every function takes plain numbers, writes one PNG atomically and returns its
path, so colabs can call them on their own results.
"""
from __future__ import annotations

import io
import os
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: CI and TPU VMs have no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cai_jax import utils  # noqa: E402

COLORS = {"helpful": "tab:blue", "sl_cai": "tab:orange", "rl_cai": "tab:green",
          "dpo_cai": "tab:red"}


def _save(fig, path: str) -> str:
  buf = io.BytesIO()
  fig.tight_layout()
  fig.savefig(buf, format="png", dpi=110)
  plt.close(fig)
  utils.atomic_write_bytes(path, buf.getvalue())
  return path


def elo_scatter(harmless: Mapping[str, Mapping], helpful: Mapping[str, Mapping], path: str,
                title: str = "Harmlessness vs helpfulness Elo") -> str:
  """Paper Fig. 2/3 (the frontier): one point per snapshot, 95% intervals as error bars.

  harmless/helpful: {snapshot: {"elo", "lo", "hi"}} (EloResult.as_dict()). Each point
  is named in the legend; labels beside points are stacked so that they never
  overlap, with a thin line to their point.
  """
  names = [n for n in harmless if n in helpful]
  fig, ax = plt.subplots(figsize=(5.6, 4.6))
  for name in names:
    h, g = harmless[name], helpful[name]
    ax.errorbar(g["elo"], h["elo"], xerr=[[g["elo"] - g["lo"]], [g["hi"] - g["elo"]]],
                yerr=[[h["elo"] - h["lo"]], [h["hi"] - h["elo"]]], fmt="o", capsize=3,
                color=COLORS.get(name), label=name)
  # Labels in a column right of the data, ordered like their points' heights.
  ys = sorted(names, key=lambda n: harmless[n]["elo"])
  x_right = max(helpful[n]["hi"] for n in names) if names else 0.0
  span = max((max(harmless[n]["hi"] for n in names) - min(harmless[n]["lo"] for n in names))
             if names else 1.0, 1.0)
  for k, name in enumerate(ys):
    y_text = min(harmless[n]["lo"] for n in names) + span * (k + 0.5) / max(len(ys), 1)
    ax.annotate(name, (helpful[name]["elo"], harmless[name]["elo"]),
                xytext=(x_right + 0.08 * span, y_text), textcoords="data", fontsize=8,
                va="center", color=COLORS.get(name, "black"),
                arrowprops={"arrowstyle": "-", "color": "0.6", "lw": 0.6})
  ax.axhline(0, color="grey", lw=0.5)
  ax.axvline(0, color="grey", lw=0.5)
  ax.set_xlabel("Helpfulness Elo (points; initial model = 0)")
  ax.set_ylabel("Harmlessness Elo (points; initial model = 0)")
  ax.set_title(title, fontsize=10)
  ax.legend(loc="best", fontsize=8)
  ax.margins(x=0.35, y=0.15)
  return _save(fig, path)


def revision_scores(series: Mapping[str, Sequence[Mapping]], path: str,
                    ylabel: str = "score (judge's units)") -> str:
  """Paper Fig. 5: score against the number of revisions (0 = initial response), one
  line per judge, 95% intervals as error bars. series: {judge: [{revision, mean, lo, hi}]}."""
  fig, ax = plt.subplots(figsize=(5.4, 3.8))
  xs_all = set()
  for label, rows in series.items():
    rows = [r for r in rows if np.isfinite(r.get("mean", np.nan))]
    if not rows:
      continue
    xs = [r["revision"] for r in rows]
    xs_all.update(xs)
    ys = np.array([r["mean"] for r in rows])
    lo = np.array([r.get("lo", np.nan) for r in rows])
    hi = np.array([r.get("hi", np.nan) for r in rows])
    err = np.where(np.isfinite(lo) & np.isfinite(hi), [ys - lo, hi - ys], 0.0)
    ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=label)
  ax.set_xlabel("Number of revisions")
  ax.set_ylabel(ylabel)
  ax.set_xticks(sorted(xs_all))
  ax.set_title("Harmlessness score vs revision number", fontsize=10)
  ax.legend(fontsize=8)
  return _save(fig, path)


def grouped_bars(values: Mapping[str, Mapping[str, float]], path: str, ylabel: str,
                 title: str, errors: Mapping[str, Mapping[str, float]] | None = None) -> str:
  """values: {group (e.g. snapshot): {series (e.g. "harmless"): value}}."""
  groups = list(values)
  series = list(dict.fromkeys(k for g in groups for k in values[g]))
  fig, ax = plt.subplots(figsize=(max(4.5, 1.4 * len(groups) + 2), 3.8))
  width = 0.8 / max(1, len(series))
  for k, s in enumerate(series):
    xs = np.arange(len(groups)) + (k - (len(series) - 1) / 2) * width
    ys = [values[g].get(s, np.nan) for g in groups]
    err = None if errors is None else [1.96 * errors.get(g, {}).get(s, 0.0) for g in groups]
    ax.bar(xs, ys, width, yerr=err, capsize=3, label=s)
  ax.set_xticks(np.arange(len(groups)))
  ax.set_xticklabels(groups)
  ax.axhline(0, color="grey", lw=0.5)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  if len(series) > 1:
    ax.legend(fontsize=8)
  return _save(fig, path)


def histogram(values: Sequence[float], path: str, xlabel: str, title: str,
              bins: int = 20, range_: tuple[float, float] | None = None) -> str:
  fig, ax = plt.subplots(figsize=(5.2, 3.6))
  ax.hist(np.asarray(values, dtype=np.float64), bins=bins, range=range_, color="tab:purple")
  ax.set_xlabel(xlabel)
  ax.set_ylabel("count")
  ax.set_title(title)
  return _save(fig, path)


def curves(series: Mapping[str, Sequence[tuple[float, float]]], path: str, title: str,
           xlabel: str = "step", ylabels: Mapping[str, str] | None = None,
           xticklabels: Sequence[str] | None = None) -> str:
  """One panel per series of (x, y) points, e.g. PPO reward and KL; every panel has
  its y axis labelled (`ylabels`, default the series name)."""
  names = list(series)
  cols = min(len(names), 3)
  rows = -(-len(names) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False)
  for k, name in enumerate(names):
    ax = axes[k // cols][k % cols]
    pts = np.asarray(series[name], dtype=np.float64).reshape(-1, 2)
    ax.plot(pts[:, 0], pts[:, 1], marker="o" if len(pts) < 40 else None, ms=3)
    ax.set_xlabel(xlabel)
    ax.set_ylabel((ylabels or {}).get(name, name))
    ax.set_title(name, fontsize=9)
    if xticklabels is not None:
      ax.set_xticks(pts[:, 0])
      ax.set_xticklabels(xticklabels, rotation=20, fontsize=7)
  for k in range(len(names), rows * cols):
    axes[k // cols][k % cols].axis("off")
  fig.suptitle(title)
  return _save(fig, path)


def rel(path: str, root: str) -> str:
  """Path of a plot relative to the report, for Markdown links."""
  if "://" in str(path):
    return str(path)[len(str(root).rstrip('/')) + 1:]
  return os.path.relpath(path, root)

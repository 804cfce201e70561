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

COLORS = {"helpful": "tab:blue", "sl_cai": "tab:orange", "rl_cai": "tab:green"}


def _save(fig, path: str) -> str:
  buf = io.BytesIO()
  fig.tight_layout()
  fig.savefig(buf, format="png", dpi=110)
  plt.close(fig)
  utils.atomic_write_bytes(path, buf.getvalue())
  return path


def elo_scatter(harmless: Mapping[str, Mapping], helpful: Mapping[str, Mapping], path: str,
                title: str = "Harmlessness vs helpfulness Elo") -> str:
  """Paper Fig. 2/3: one point per snapshot, 95% intervals as error bars.

  harmless/helpful: {snapshot: {"elo", "lo", "hi"}} (EloResult.as_dict()).
  """
  fig, ax = plt.subplots(figsize=(5.2, 4.4))
  for k, name in enumerate(harmless):
    if name not in helpful:
      continue
    h, g = harmless[name], helpful[name]
    ax.errorbar(g["elo"], h["elo"], xerr=[[g["elo"] - g["lo"]], [g["hi"] - g["elo"]]],
                yerr=[[h["elo"] - h["lo"]], [h["hi"] - h["elo"]]], fmt="o", capsize=3,
                color=COLORS.get(name), label=name)
    # Labels step down so that snapshots with close ratings stay readable.
    ax.annotate(name, (g["elo"], h["elo"]), textcoords="offset points", xytext=(6, 6 - 12 * k))
  ax.axhline(0, color="grey", lw=0.5)
  ax.axvline(0, color="grey", lw=0.5)
  ax.set_xlabel("Helpfulness Elo")
  ax.set_ylabel("Harmlessness Elo")
  ax.set_title(title)
  ax.legend(loc="best", fontsize=8)
  return _save(fig, path)


def revision_scores(rows: Sequence[Mapping], path: str) -> str:
  """Paper Fig. 5: PM score against revision number (0 = initial response)."""
  fig, ax = plt.subplots(figsize=(5.2, 3.8))
  for key, label in (("harmless", "harmlessness PM score"), ("mean", "PM score")):
    xs = [r["revision"] for r in rows if key in r]
    if not xs:
      continue
    ys = np.array([r[key] for r in rows if key in r])
    se = np.array([r.get(key + "_se", 0.0) for r in rows if key in r])
    ax.errorbar(xs, ys, yerr=1.96 * se, marker="o", capsize=3, label=label)
  ax.set_xlabel("Number of revisions")
  ax.set_ylabel("PM score")
  ax.set_xticks(sorted({r["revision"] for r in rows}))
  ax.set_title("PM score vs revision number")
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
           xlabel: str = "step") -> str:
  """One panel per series of (x, y) points, e.g. PPO reward and KL."""
  names = list(series)
  fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.4), squeeze=False)
  for ax, name in zip(axes[0], names):
    pts = np.asarray(series[name], dtype=np.float64).reshape(-1, 2)
    ax.plot(pts[:, 0], pts[:, 1], marker="." if len(pts) < 40 else None)
    ax.set_xlabel(xlabel)
    ax.set_title(name)
  fig.suptitle(title)
  return _save(fig, path)


def rel(path: str, root: str) -> str:
  """Path of a plot relative to the report, for Markdown links."""
  if "://" in str(path):
    return str(path)[len(str(root).rstrip('/')) + 1:]
  return os.path.relpath(path, root)

"""Preference comparisons: reading them, encoding them, mixing sources, and scoring
a preference model on held-out pairs (accuracy, soft ranking loss, calibration).

Used by the PM stage, the DPO stage and any other model trained or judged on
comparisons (an evaluation judge trained on human comparisons only).
"""
from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

from cai_jax import multihost, sharding as shd, text as text_lib, utils
from cai_jax.evaluation import calibration as calibration_lib
from cai_jax.training import data, losses, objectives
from cai_jax.utils import InputError


def _paths(value) -> list[str]:
  items = [value] if isinstance(value, str) else list(value or ())
  return [p.strip() for x in items for p in str(x).split(",") if p.strip()]


def read_ai_preferences(path: str) -> list[dict]:
  """{prompt (messages), a, b, p} from the label stage's preferences.jsonl."""
  return [ai_pair(r, f"{path}:{i}") for i, r in enumerate(utils.read_jsonl(path), 1)]


def ai_pair(r: dict, where: str) -> dict:
  """One label record ({prompt, response_a, response_b, p_a[, axes]}) as a training
  pair; `where` names it in the error."""
  try:
    p = float(r["p_a"])
    item = {"prompt": r["prompt"], "a": str(r["response_a"]), "b": str(r["response_b"]),
            "p": p, "source": "ai"}
  except (KeyError, TypeError, ValueError):
    raise InputError(f"{where}: expected prompt, response_a, response_b and p_a (a number); "
                     "regenerate with the label stage") from None
  if not 0.0 <= p <= 1.0 or not isinstance(item["prompt"], list):
    raise InputError(f"{where}: p_a must lie in [0, 1] and prompt be a message list")
  if "axes" in r:  # label.per_axis: each axis's label
    try:
      item["axes"] = {str(k): float(v["p_a"]) for k, v in r["axes"].items()}
    except (AttributeError, KeyError, TypeError, ValueError):
      raise InputError(f"{where}: axes must map each axis to its label fields (p_a); "
                       "regenerate with the label stage") from None
  return item


def axis_labels(ai: list, human: list, names, human_axis: str, path: str) -> None:
  """Per-axis targets for a PM with a head per axis (in place): an AI pair labels
  every axis (its record's `axes`); a human pair labels `human_axis` only (the
  paper's human comparisons are helpfulness comparisons)."""
  names = list(names)
  for it in ai:
    got = it.get("axes")
    if got is None or sorted(got) != sorted(names):
      raise InputError(f"{path}: a label has axes {sorted(got) if got else 'none'}, the PM's "
                       f"heads are {names}; label with --config.label.per_axis=True under the "
                       "same constitution")
    it["p_axes"] = np.asarray([got[n] for n in names], np.float32)
    it["w_axes"] = np.ones(len(names), np.float32)
  if human and human_axis not in names:
    raise InputError(f"config.pm.human_axis={human_axis!r} is not an axis of the constitution "
                     f"({', '.join(names)}); name the axis the human comparisons train")
  for it in human:
    it["p_axes"] = np.where(np.asarray(names) == human_axis, it["p"], 0.5).astype(np.float32)
    it["w_axes"] = (np.asarray(names) == human_axis).astype(np.float32)


def read_human_pairs(paths, limit: int = -1) -> list[dict]:
  """hh-rlhf comparisons as hard-labelled pairs (A = chosen, p = 1)."""
  from cai_jax.data import sources
  out = []
  for path in _paths(paths):
    if not utils.exists(path):
      raise InputError(f"{path}: human comparison file not found; fix config.pm.human_data "
                       "or config.pm.pretrain_data")
    for j, r in enumerate(sources.hh_rlhf_pairs(path)):
      if 0 <= limit <= j:
        break
      msgs = sources.prompt_messages(text_lib.parse_transcript(r["prompt"], r["id"]), r["id"])
      out.append({"prompt": msgs, "a": r["chosen"].strip(), "b": r["rejected"].strip(),
                  "p": 1.0, "source": "human"})
  return out


def read_comparisons(section, name: str, label_file: str, learner: str):
  """(AI comparisons, human comparisons) a preference learner trains on: the label
  stage's file (or config.<name>.preferences; "none" skips it) and the hh-rlhf
  files of config.<name>.human_data. `learner` names what trains, for the warning."""
  path = section.preferences or label_file
  ai = []
  if path != "none":
    if not utils.exists(path):
      raise InputError(f"{path}: AI preference labels not found; run the label stage first "
                       f"(config.stages includes label), set config.{name}.preferences, or "
                       "'none' to train on human comparisons only")
    ai = read_ai_preferences(path)
  human = read_human_pairs(section.human_data, int(section.max_human_pairs))
  if not ai and not human:
    raise InputError(f"config.{name}: no comparisons (preferences is 'none'/empty and "
                     "human_data is empty); give AI labels or hh-rlhf files")
  if not human:
    logging.warning("%s: no human comparisons (config.%s.human_data is empty): %s learns AI "
                    "harmlessness labels alone, not the paper's harmlessness + helpfulness mix",
                    name, name, learner)
  return ai, human


def encode_pairs(enc, items: list[dict], L: int, seed: int, make=data.pair_example) -> list:
  """Tokenised pairs (`make`: `data.pair_example`, or `data.dpo_pair`); hard human
  pairs are put in random A/B order (p 1 or 0) so the model cannot learn a position."""
  rng = np.random.default_rng([seed, 7])
  out = []
  for it in items:
    a, b, p = it["a"], it["b"], it["p"]
    p_axes = it.get("p_axes")
    if it["source"] == "human" and rng.random() < 0.5:
      a, b, p = b, a, 1.0 - p
      p_axes = None if p_axes is None else 1.0 - p_axes
    ex = make(enc, it["prompt"], a, b, p, L)
    if p_axes is not None:  # per-axis targets (`axis_labels`)
      ex = dataclasses.replace(ex, p_axes=p_axes, w_axes=it["w_axes"])
    out.append(ex)
  return out


def train_and_eval(ai_enc: list, hu_enc: list, section, seed: int):
  """(training mixture, {"ai": held-out, "human": held-out}): each source split by
  config.<section>.eval_fraction, held-out sets capped at max_eval_pairs, the rest
  mixed at human_fraction."""
  splits = {}
  for src, enc in (("ai", ai_enc), ("human", hu_enc)):
    splits[src] = data.split_eval(len(enc), float(section.eval_fraction), seed) \
        if enc else ([], [])
  k = int(section.max_eval_pairs)
  eval_sets = {src: [enc[i] for i in splits[src][1]][:k if k >= 0 else None]
               for src, enc in (("ai", ai_enc), ("human", hu_enc))}
  train = mix([ai_enc[i] for i in splits["ai"][0]], [hu_enc[i] for i in splits["human"][0]],
              float(section.human_fraction), seed)
  return train, eval_sets


def mix(ai: list, human: list, fraction: float, seed: int) -> list:
  """Training mixture with `fraction` human comparisons (subsampling the larger side)."""
  if not human or fraction <= 0:
    return list(ai)
  if not ai or fraction >= 1:
    return list(human)
  rng = np.random.default_rng([seed, 11])
  n_h = int(round(len(ai) * fraction / (1 - fraction)))
  if n_h <= len(human):
    return list(ai) + [human[i] for i in rng.permutation(len(human))[:n_h]]
  n_ai = int(round(len(human) * (1 - fraction) / fraction))
  return [ai[i] for i in rng.permutation(len(ai))[:n_ai]] + list(human)


# ------------------------------------------------------------------ metrics
def calibration(probs: np.ndarray, labels: np.ndarray, bins: int = 10) -> dict:
  """ECE of P(A better) against (soft) labels, and its non-empty bins."""
  b = calibration_lib.calibration_bins(probs, labels, bins)
  table = [{"bin": k, "count": int(b["count"][k]), "predicted": float(b["confidence"][k]),
            "observed": float(b["accuracy"][k])} for k in range(bins) if b["count"][k]]
  return {"ece": calibration_lib.expected_calibration_error(probs, labels, bins), "bins": table}


def over_pairs(f, params, pairs, make_batch, B, mesh, rules) -> np.ndarray:
  """f(params, batch) -> per-row values, for every pair: batches of B on the mesh,
  the last one padded by repetition; returns the values of the real pairs."""
  out = []
  for i in range(0, len(pairs), B):
    chunk = list(pairs[i:i + B])
    n = len(chunk)
    chunk += [chunk[-1]] * (B - n)
    batch = shd.shard_batch(make_batch(chunk), mesh, rules)
    out.append(np.asarray(multihost.to_host(f(params, batch)))[:n])
  return np.concatenate(out) if out else np.zeros((0,), np.float32)


# Module-level jits keyed on the (hashable) model config: every evaluation of a
# run reuses one compilation instead of tracing a fresh lambda each time.
@functools.partial(jax.jit, static_argnums=0)
def _margins(cfg, params, batch):
  return jnp.subtract(*objectives.pair_rewards(cfg, params, batch))


@functools.partial(jax.jit, static_argnums=0)
def _pair_logprobs(cfg, params, batch):
  return jnp.stack(objectives.pair_sequence_logprobs(cfg, params, batch), axis=1)


def pair_margins(cfg, params, pairs, L, pad, B, mesh, rules) -> np.ndarray:
  """r_a - r_b for every pair."""
  return over_pairs(functools.partial(_margins, cfg), params, pairs,
                    lambda c: data.pair_batch(c, L, pad), B, mesh, rules)


def dpo_logprobs(cfg, params, pairs, L, pad, B, mesh, rules) -> np.ndarray:
  """[n, 2]: log π(a) and log π(b) of every DPO pair under `params`."""
  out = over_pairs(functools.partial(_pair_logprobs, cfg), params, pairs,
                   lambda c: data.dpo_batch(c, L, pad), B, mesh, rules)
  return out.reshape(-1, 2)


def evaluate_pairs(cfg, params, pairs, L, pad, B, mesh, rules, bins) -> dict:
  """Accuracy, soft ranking loss and calibration of r_a - r_b against the labels;
  with a head per axis, over every labelled (pair, axis) entry, and per axis
  (`<metric>_<axis>`)."""
  d = pair_margins(cfg, params, pairs, L, pad, B, mesh, rules)
  if d.ndim == 1:
    return _pair_metrics(d, np.array([x.p_a for x in pairs], np.float64), bins)
  p = np.stack([x.p_axes for x in pairs]).astype(np.float64)
  w = np.stack([x.w_axes for x in pairs]) > 0
  out = _pair_metrics(d[w], p[w], bins)
  for j, name in enumerate(cfg.score_labels):
    if w[:, j].any():
      m = _pair_metrics(d[w[:, j], j], p[w[:, j], j], bins)
      out.update({f"{k}_{name}": v for k, v in m.items() if k != "calibration_bins"})
  out.update(num_labels=out["num_pairs"], num_pairs=len(pairs))
  return out


def _pair_metrics(d: np.ndarray, p: np.ndarray, bins: int) -> dict:
  prob = 1.0 / (1.0 + np.exp(-d.astype(np.float64)))
  decided = p != 0.5
  acc = float(((d > 0) == (p > 0.5))[decided].mean()) if decided.any() else float("nan")
  loss = float(np.mean(np.asarray(losses.ranking_loss(jnp.asarray(d), jnp.zeros_like(d),
                                                       jnp.asarray(p, jnp.float32)))))
  cal = calibration(prob, p, bins)
  return {"accuracy": acc, "loss": loss, "ece": cal["ece"], "num_pairs": len(d),
          "calibration_bins": cal["bins"]}

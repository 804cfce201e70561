"""Preference model: trunk + scalar head at the last token, soft ranking loss.

Reads the label stage's AI harmlessness comparisons (WORKDIR/label/
preferences.jsonl, soft p_a) and mixes in human comparisons from hh-rlhf
jsonl(.gz) files at a configured ratio. An optional PM-pretraining phase
first trains on hh-rlhf comparisons. Reports held-out pairwise accuracy and
calibration (expected calibration error of σ(r_a - r_b) against the labels)
and exports WORKDIR/pm/final/ (HF format with the score head and tokenizer).

  python -m cai_jax.main --config=configs/tiny.py --workdir=/tmp/cai \\
      --config.stages=pm
"""
from __future__ import annotations

import json
import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cai_jax import models, sharding as shd, text as text_lib, utils
from cai_jax.stages.sft import export_final, split_eval, tensorboard_writer
from cai_jax.training import checkpoint, data, flops as flops_lib, loop, objectives, optim
from cai_jax.training import init as init_lib
from cai_jax.training import losses
from cai_jax.training import state as state_lib
from cai_jax.utils import InputError


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.init_from = ""            # "" = WORKDIR/sft/final if present, else config.model
  c.preferences = ""          # AI comparisons; "" = WORKDIR/label/preferences.jsonl; "none" = skip
  c.human_data = ""           # comma-separated hh-rlhf jsonl(.gz) files of human comparisons
  c.human_fraction = 0.5      # share of human comparisons in the training mixture (0..1)
  c.max_human_pairs = -1      # cap on human pairs read per file (-1 = all)
  c.pretrain_data = ""        # comma-separated hh-rlhf files for PM pretraining ("" = no phase)
  c.pretrain_steps = 0        # PM-pretraining steps (0 = no phase)
  c.pretrain_lr = 1e-5        # learning rate of the pretraining phase
  c.eval_fraction = 0.1       # pairs of each source held out for accuracy/calibration
  c.max_eval_pairs = -1       # evaluate on at most this many held-out pairs per source (-1 = all)
  c.max_len = 512             # tokens per response sequence (the end is kept)
  c.batch_size = 8            # pairs per step (global)
  c.num_epochs = 1.0          # passes over the mixture
  c.max_steps = -1            # cap on fine-tuning steps; -1 = num_epochs worth
  c.train_top_layers = -1     # -1 trains everything; k trains top k blocks + final norm + head
  c.score_init_std = 0.0      # scalar head init (0 = start from r = bias for every input)
  c.calibration_bins = 10     # bins for the expected calibration error
  c.eval_every = 0            # steps between evals; 0 = only at the end
  c.log_every = 10            # steps between progress/TensorBoard updates
  c.optim = optim.default_optim_config()  # AdamW for the fine-tuning phase
  c.checkpoint_every = 100    # steps between Orbax checkpoints
  c.keep_checkpoints = 2      # checkpoints kept per phase
  c.async_checkpoint = True   # write checkpoints in the background
  c.tensorboard = True        # TensorBoard scalars in WORKDIR/pm/tb
  c.progress = True           # progress bar with tokens/s and MFU
  return c


# -------------------------------------------------------------------- data
def read_ai_preferences(path: str) -> list[dict]:
  """{prompt (messages), a, b, p} from the label stage's preferences.jsonl."""
  out = []
  for i, r in enumerate(utils.read_jsonl(path), 1):
    where = f"{path}:{i}"
    try:
      p = float(r["p_a"])
      item = {"prompt": r["prompt"], "a": str(r["response_a"]), "b": str(r["response_b"]),
              "p": p, "source": "ai"}
    except (KeyError, TypeError, ValueError):
      raise InputError(f"{where}: expected prompt, response_a, response_b and p_a (a number); "
                       "regenerate with the label stage") from None
    if not 0.0 <= p <= 1.0 or not isinstance(item["prompt"], list):
      raise InputError(f"{where}: p_a must lie in [0, 1] and prompt be a message list")
    out.append(item)
  return out


def read_human_pairs(paths: str, limit: int = -1) -> list[dict]:
  """hh-rlhf comparisons as hard-labelled pairs (A = chosen, p = 1)."""
  from cai_jax.data import sources
  out = []
  for path in [p.strip() for p in paths.split(",") if p.strip()]:
    if not os.path.exists(path):
      raise InputError(f"{path}: human comparison file not found; fix config.pm.human_data "
                       "or config.pm.pretrain_data")
    for j, r in enumerate(sources.hh_rlhf_pairs(path)):
      if 0 <= limit <= j:
        break
      msgs = sources.prompt_messages(text_lib.parse_transcript(r["prompt"], r["id"]), r["id"])
      out.append({"prompt": msgs, "a": r["chosen"].strip(), "b": r["rejected"].strip(),
                  "p": 1.0, "source": "human"})
  return out


def encode_pairs(tok, items: list[dict], fmt: str, L: int, seed: int) -> list[data.PairExample]:
  """Tokenised pairs; hard human pairs are put in random A/B order (p 1 or 0)
  so the model cannot learn a position."""
  rng = np.random.default_rng([seed, 7])
  out = []
  for it in items:
    a, b, p = it["a"], it["b"], it["p"]
    if it["source"] == "human" and rng.random() < 0.5:
      a, b, p = b, a, 1.0 - p
    out.append(data.encode_pair(tok, it["prompt"], a, b, p, fmt, L))
  return out


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
  """Expected calibration error of P(A better) against (soft) labels."""
  probs, labels = np.asarray(probs, np.float64), np.asarray(labels, np.float64)
  edges = np.linspace(0, 1, bins + 1)
  which = np.clip(np.digitize(probs, edges[1:-1]), 0, bins - 1)
  ece, table = 0.0, []
  for k in range(bins):
    m = which == k
    if not m.any():
      continue
    conf, freq = probs[m].mean(), labels[m].mean()
    ece += m.mean() * abs(conf - freq)
    table.append({"bin": k, "count": int(m.sum()), "predicted": float(conf),
                  "observed": float(freq)})
  return {"ece": float(ece), "bins": table}


def pair_margins(cfg, params, pairs, L, pad, B, mesh, rules) -> np.ndarray:
  """r_a - r_b for every pair (batched, last batch padded by repetition)."""
  f = jax.jit(lambda p, b: jnp.subtract(*objectives.pair_rewards(cfg, p, b)))
  out = []
  for i in range(0, len(pairs), B):
    chunk = list(pairs[i:i + B])
    n = len(chunk)
    chunk += [chunk[-1]] * (B - n)
    batch = shd.shard_batch(data.pair_batch(chunk, L, pad), mesh, rules)
    out.append(np.asarray(jax.device_get(f(params, batch)))[:n])
  return np.concatenate(out) if out else np.zeros((0,), np.float32)


def evaluate_pairs(cfg, params, pairs, L, pad, B, mesh, rules, bins) -> dict:
  d = pair_margins(cfg, params, pairs, L, pad, B, mesh, rules)
  p = np.array([x.p_a for x in pairs], np.float64)
  prob = 1.0 / (1.0 + np.exp(-d.astype(np.float64)))
  decided = p != 0.5
  acc = float(((d > 0) == (p > 0.5))[decided].mean()) if decided.any() else float("nan")
  loss = float(np.mean(np.asarray(losses.ranking_loss(jnp.asarray(d), jnp.zeros_like(d),
                                                       jnp.asarray(p, jnp.float32)))))
  cal = calibration(prob, p, bins)
  return {"accuracy": acc, "loss": loss, "ece": cal["ece"], "num_pairs": len(pairs),
          "calibration_bins": cal["bins"]}


# ------------------------------------------------------------------ phases
def _train_phase(name, cfg, params, tok, train_pairs, eval_sets, config, out, steps, lr,
                 mesh, rules):
  """One training phase with its own checkpoint directory; returns (params, result)."""
  pc = config.pm
  L, B = int(pc.max_len), int(pc.batch_size)
  pad = tok.pad_token_id if tok.pad_token_id is not None else (cfg.pad_token_id or 0)
  if len(train_pairs) < B:
    raise InputError(f"{name}: {len(train_pairs)} training pairs cannot fill one batch of {B}; "
                     "lower config.pm.batch_size or add comparisons")
  make = lambda idx: data.pair_batch([train_pairs[i] for i in idx], L, pad)  # noqa: E731
  batches = data.BatchIterator(data.ShuffledIndex(len(train_pairs), B, config.seed), make)
  oc = ml_collections.ConfigDict(pc.optim.to_dict())
  oc.learning_rate = lr
  trainable = None
  if int(pc.train_top_layers) >= 0:
    trainable = optim.trainable_mask(params, int(pc.train_top_layers), train_embeddings=False)
  tx = optim.make_optimizer(oc, total_steps=steps, trainable=trainable)
  st = state_lib.create_train_state(params, tx, cfg, mesh, rules)
  step_fn = loop.make_train_step(objectives.pm_loss_fn(cfg), tx, st, mesh,
                                 make(np.arange(B)), trainable)

  def eval_fn(p, step):
    res = {}
    for src, pairs in eval_sets.items():
      if pairs:
        ev = evaluate_pairs(cfg, p, pairs, L, pad, B, mesh, rules, int(pc.calibration_bins))
        res.update({f"{src}_{k}": v for k, v in ev.items() if k != "calibration_bins"})
        res[f"{src}_calibration_bins"] = ev["calibration_bins"]
    return res

  ckpt_dir = os.path.join(out, "checkpoints", name)
  init_lib.prepare_checkpoint_dir(ckpt_dir, cfg, tok)
  mngr = checkpoint.Manager(ckpt_dir, max_to_keep=int(pc.keep_checkpoints),
                            save_interval_steps=int(pc.checkpoint_every),
                            async_save=bool(pc.async_checkpoint))
  writer = tensorboard_writer(bool(pc.tensorboard), os.path.join(out, "tb", name))
  try:
    res = loop.train(step_fn=step_fn, state=st, batches=batches, mesh=mesh, num_steps=steps,
                     rng=jax.random.PRNGKey(config.seed), manager=mngr,
                     eval_fn=eval_fn if any(eval_sets.values()) else None,
                     eval_every=int(pc.eval_every), writer=writer,
                     flops_per_token=flops_lib.train_flops_per_token(
                         cfg, L, lm_head=False, trainable_layers=int(pc.train_top_layers)),
                     log_every=int(pc.log_every), desc=name, progress=bool(pc.progress),
                     rules=rules)
  finally:
    mngr.close()
    if writer is not None:
      writer.close()
  return res.state.params, res


def _steps(n_pairs, B, epochs, cap):
  s = max(int(np.ceil(float(epochs) * (n_pairs // B))), 1)
  return min(s, int(cap)) if int(cap) > 0 else s


def run(config, workdir: str) -> dict:
  pc = config.pm
  out = os.path.join(workdir, "pm")
  done = utils.done_info(out)
  if done is not None:
    return done
  fmt, L, seed = config.prompt_format, int(pc.max_len), int(config.seed)
  pref_path = pc.preferences or os.path.join(workdir, "label", "preferences.jsonl")
  ai = []
  if pref_path != "none":
    if not os.path.exists(pref_path):
      raise InputError(f"{pref_path}: AI preference labels not found; run the label stage first "
                       "(config.stages includes label), set config.pm.preferences, or 'none' to "
                       "train on human comparisons only")
    ai = read_ai_preferences(pref_path)
  human = read_human_pairs(pc.human_data, int(pc.max_human_pairs)) if pc.human_data else []
  if not ai and not human:
    raise InputError("config.pm: no comparisons (preferences is 'none'/empty and human_data is "
                     "empty); give AI labels or hh-rlhf files")
  sft_final = os.path.join(workdir, "sft", "final")
  init_path = pc.init_from or (sft_final if os.path.isdir(sft_final) else config.model)
  cfg, params, tok = init_lib.load_init(init_path, seed=seed, dtype=config.dtype)
  params = models.add_score_head(cfg, models.drop_heads(params, ()), jax.random.PRNGKey(seed),
                                 init_std=float(pc.score_init_std))

  ai_enc = encode_pairs(tok, ai, fmt, L, seed)
  hu_enc = encode_pairs(tok, human, fmt, L, seed)
  ai_tr, ai_ev = split_eval(len(ai_enc), float(pc.eval_fraction), seed) if ai_enc else ([], [])
  hu_tr, hu_ev = split_eval(len(hu_enc), float(pc.eval_fraction), seed) if hu_enc else ([], [])
  k = int(pc.max_eval_pairs)
  eval_sets = {"ai": [ai_enc[i] for i in ai_ev][:k if k >= 0 else None],
               "human": [hu_enc[i] for i in hu_ev][:k if k >= 0 else None]}
  train = mix([ai_enc[i] for i in ai_tr], [hu_enc[i] for i in hu_tr], float(pc.human_fraction),
              seed)
  mesh = shd.mesh_from_config(config)
  rules = shd.rules_from_config(config)
  B = int(pc.batch_size)
  if B % shd.batch_divisor(mesh, rules):
    raise InputError(f"config.pm.batch_size={B} is not divisible by the data-parallel size "
                     f"{shd.batch_divisor(mesh, rules)}")

  summary = {"num_ai_pairs": len(ai), "num_human_pairs": len(human), "num_train_pairs": len(train),
             "init_from": init_path}
  ft_dir = os.path.join(out, "checkpoints", "pm")
  ft_started = False
  if os.path.isdir(ft_dir):
    m = checkpoint.Manager(ft_dir, read_only=True)
    ft_started = m.latest_step() is not None
    m.close()
  if int(pc.pretrain_steps) > 0 and pc.pretrain_data and not ft_started:
    pre = encode_pairs(tok, read_human_pairs(pc.pretrain_data), fmt, L, seed + 1)
    params, pres = _train_phase("pmp", cfg, params, tok, pre, {}, config, out,
                                int(pc.pretrain_steps), float(pc.pretrain_lr), mesh, rules)
    params = state_lib.to_host(params)
    summary["pretrain"] = {"steps": pres.step, "num_pairs": len(pre),
                           "final_loss": pres.history[-1]["loss"] if pres.history else None}
  steps = _steps(len(train), B, pc.num_epochs, pc.max_steps)
  params, res = _train_phase("pm", cfg, params, tok, train, eval_sets, config, out, steps,
                             float(pc.optim.learning_rate), mesh, rules)
  summary.update({"steps": res.step, "resumed_from": res.resumed_from,
                  "final_loss": res.history[-1]["loss"] if res.history else None,
                  "eval": {k: v for k, v in (res.evals[-1] if res.evals else {}).items()
                           if not k.endswith("calibration_bins")}})
  if res.evals:
    utils.atomic_write_text(os.path.join(out, "eval.json"), json.dumps(res.evals[-1], indent=2))
  logging.info("pm: %s", summary)
  export_final(cfg, params, tok, os.path.join(out, "final"))
  if jax.process_index() == 0:
    utils.mark_done(out, summary)
  return summary

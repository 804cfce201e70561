"""RL-CAI: PPO of the SL-CAI policy against the preference model.

Policy and the frozen reference start from WORKDIR/sft/final/ (or
`ppo.policy_init`, falling back to `config.model`); the reward is the frozen
preference model WORKDIR/pm/final/ read at the last real token; the value
model starts from the PM (or the policy). Everything shares one mesh.

Writes WORKDIR/ppo/: metrics.jsonl (one line per iteration), samples.jsonl
(every `log_samples_every` iterations), tb/ (TensorBoard), curves.png,
checkpoints/ (the whole state: policy, value, both optimizers, β, reward
normaliser, RNG and prompt position; a killed run resumes exactly), final/
(policy, HF format) and value_final/ (value model), then DONE.

  python -m cai_jax.main --config=configs/tiny.py --workdir=/tmp/cai \\
      --config.stages=ppo
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time

import jax
import ml_collections
import numpy as np

from cai_jax import models, sharding, utils
from cai_jax.rl import config as rl_config
from cai_jax.rl import prompt_mix, rollout as rollout_lib, trainer as trainer_lib
from cai_jax.stages import common
from cai_jax.utils import InputError

# Metric keys whose values depend on wall time, not on the run's numbers.
TIMING_KEYS = ("time/", "tokens_per_sec")


def default_config() -> ml_collections.ConfigDict:
  """The `ppo` section (see cai_jax/rl/config.py for every field)."""
  return rl_config.ppo_section()


def _policy_path(config, workdir: str) -> str:
  pc = config.ppo
  if pc.policy_init:
    return pc.policy_init
  sft = os.path.join(workdir, "sft", "final")
  if os.path.isdir(sft):
    return sft
  if config.get("model", ""):
    logging.warning("ppo: %s not found; starting the policy from config.model=%s",
                    sft, config.model)
    return config.model
  raise InputError(f"{sft}: SL-CAI model not found; run the sft stage first or set "
                   "config.ppo.policy_init")


def _pm_path(config, workdir: str) -> str:
  path = config.ppo.pm_path or os.path.join(workdir, "pm", "final")
  if not os.path.exists(path):
    raise InputError(f"{path}: preference model not found; run the pm stage first or set "
                     "config.ppo.pm_path")
  return path


def encode_prompts(config, tok, kind: str) -> list:
  from cai_jax import text as text_lib
  from cai_jax.data import prompts as prompts_lib
  from cai_jax.sampling import encode_prompt
  records = prompts_lib.load_prompts(config.data, kind=kind, split="train")
  out = []
  for r in records:
    ids = encode_prompt(tok, text_lib.render(r["messages"], config.prompt_format, tok))
    out.append({"id": r["id"], "kind": kind, "ids": ids})
  return out


def _keep_short(prompts: list, limit: int, kind: str) -> list:
  kept = [p for p in prompts if 0 < len(p["ids"]) <= limit]
  if len(kept) < len(prompts):
    logging.warning("ppo: dropped %d of %d %s prompts longer than max_prompt_tokens=%d",
                    len(prompts) - len(kept), len(prompts), kind, limit)
  return kept


def export_model(cfg, params, tok, out_dir: str) -> None:
  tmp = out_dir + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  models.save_pretrained(cfg, jax.device_get(params), tmp, tokenizer=tok)
  shutil.rmtree(out_dir, ignore_errors=True)
  os.replace(tmp, out_dir)


def _kept_lines(path: str, upto: int) -> list:
  """Lines of a jsonl log whose iteration is <= upto (a resume drops the rest)."""
  if not os.path.exists(path):
    return []
  keep = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        rec = json.loads(line)
      except json.JSONDecodeError:
        continue  # a line cut by the interruption
      if rec.get("iteration", 0) <= upto:
        keep.append(line if line.endswith("\n") else line + "\n")
  return keep


def plot_curves(metrics_path: str, png_path: str) -> None:
  """Reward and KL per iteration as a PNG."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = list(utils.read_jsonl(metrics_path))
  if not rows:
    return
  it = [r["iteration"] for r in rows]
  fig, ax = plt.subplots(1, 2, figsize=(10, 3.5))
  ax[0].plot(it, [r["reward"] for r in rows], marker="o")
  ax[0].set(xlabel="iteration", ylabel="PM reward (mean)", title="reward")
  ax[1].plot(it, [r["kl"] for r in rows], marker="o", label="k1 (mean log-ratio)")
  ax[1].plot(it, [r["kl_k3"] for r in rows], marker="x", label="k3 (non-negative)")
  ax[1].set(xlabel="iteration", ylabel="KL to reference (nats / sequence)", title="KL")
  ax[1].legend()
  fig.tight_layout()
  tmp = png_path + ".tmp.png"
  fig.savefig(tmp, dpi=100)
  plt.close(fig)
  os.replace(tmp, png_path)


def run(config, workdir: str, reward_fn=None) -> dict:
  """Runs (or resumes) PPO; returns the summary written to DONE.

  reward_fn: optional replacement for the preference model (tests, ablations),
  `fn(batch) -> scores_B` over batch["tokens"/"mask"/"response_tokens"/
  "response_mask"].
  """
  from cai_jax.sampling import stops
  from cai_jax.text import stop_strings
  from cai_jax.training import checkpoint
  from tqdm.auto import tqdm

  out = os.path.join(workdir, "ppo")
  done = utils.done_info(out)
  if done is not None:
    return done
  os.makedirs(out, exist_ok=True)
  pc = config.ppo
  mesh = sharding.mesh_from_config(config)
  rules = sharding.rules_from_config(config)
  dtype = config.get("dtype", None)
  seed = int(config.get("seed", 0))

  policy_path = _policy_path(config, workdir)
  pcfg, pparams, tok = common.load_model(policy_path, seed=seed, dtype=dtype)
  if "lm" not in models.heads_of(pcfg, pparams):
    raise InputError(f"{policy_path}: the policy has no LM head; point ppo.policy_init at a "
                     "language model")
  pparams = models.drop_heads(pparams, ("lm",))
  if reward_fn is None or pc.value_init == "pm":
    pm_path = _pm_path(config, workdir)
    pm_cfg, pm_params, _ = common.load_model(pm_path, seed=seed + 1, dtype=dtype,
                                             heads=("lm", "score"))
    if "score" not in models.heads_of(pm_cfg, pm_params):
      raise InputError(f"{pm_path}: preference model has no score head (score.weight); "
                       "export it from the pm stage")
    if pm_cfg.vocab_size != pcfg.vocab_size:
      raise InputError(f"{pm_path}: preference model vocabulary ({pm_cfg.vocab_size}) differs "
                       f"from the policy's ({pcfg.vocab_size}); use models sharing a tokenizer")
    pm_params = models.drop_heads(pm_params, ("score",))
  if pc.value_init == "pm":
    vcfg, vparams = pm_cfg, pm_params
  elif pc.value_init == "policy":
    vcfg = pcfg
    vparams = models.drop_heads(models.add_score_head(pcfg, pparams), ("score",))
  else:
    raise InputError(f"config.ppo.value_init={pc.value_init!r}: use 'pm' or 'policy'")
  if reward_fn is None:
    pm_sharded = sharding.shard_params(pm_params, pm_cfg, mesh, rules)
    reward_fn = rollout_lib.pm_reward_fn(pm_cfg, pm_sharded)

  # Prompts: a fixed padded length, so every iteration reuses one compilation.
  limit = min(int(pc.max_prompt_tokens), pcfg.max_position_embeddings - int(pc.max_new_tokens))
  red = _keep_short(encode_prompts(config, tok, "red_team"), limit, "red_team") \
      if pc.red_team_fraction > 0 else []
  helpful = _keep_short(encode_prompts(config, tok, "helpful"), limit, "helpful") \
      if pc.red_team_fraction < 1 else []
  mix = prompt_mix.PromptMix(red, helpful, pc.red_team_fraction, int(pc.batch_size), seed)
  longest = max(len(p["ids"]) for p in red + helpful)
  from cai_jax.sampling import bucket_length
  P = min(bucket_length(longest), limit)
  pad_id = pcfg.pad_token_id if pcfg.pad_token_id is not None else 0

  eos = sorted({i for i in (pcfg.eos_token_id, getattr(tok, "eos_token_id", None))
                if i is not None})
  matcher = stops.from_strings(tok, stop_strings(config.prompt_format, tok), pcfg.vocab_size)
  trainer = trainer_lib.PPOTrainer(pc, policy_cfg=pcfg, policy_params=pparams, value_cfg=vcfg,
                                   value_params=vparams, reward_fn=reward_fn, mesh=mesh,
                                   eos_ids=eos, stop_seqs=matcher, rules=rules)
  del pparams, vparams  # host copies; the trainer holds sharded ones
  pm_params = None
  state = trainer.init_state()
  rng = jax.random.PRNGKey(seed)

  mngr = checkpoint.Manager(os.path.join(out, "checkpoints"), max_to_keep=int(pc.max_to_keep),
                            async_save=False)
  start = 0
  latest = mngr.latest_step()
  if latest is not None:
    state, data = mngr.restore(latest, target=state)
    trainer.load_controller_state(data["controller"])
    mix.load_state_dict(data["prompts"])
    rng = jax.numpy.asarray(np.asarray(data["rng"], np.uint32))
    start = int(data["iteration"])
    logging.info("ppo: resumed from iteration %d", start)
  metrics_path = os.path.join(out, "metrics.jsonl")
  samples_path = os.path.join(out, "samples.jsonl")
  for path in (metrics_path, samples_path):
    utils.atomic_write_text(path, "".join(_kept_lines(path, start)))

  from cai_jax.stages.sft import tensorboard_writer
  writer = tensorboard_writer(bool(pc.tensorboard), os.path.join(out, "tb"))
  total = int(pc.num_iterations)
  bar = tqdm(total=total, initial=start, desc="ppo", disable=not pc.progress,
             dynamic_ncols=True)
  last = {}
  try:
    with open(metrics_path, "a", encoding="utf-8") as mf, \
        open(samples_path, "a", encoding="utf-8") as sf:
      for it in range(start + 1, total + 1):
        batch = mix.next_batch()
        toks, mask = prompt_mix.left_pad([p["ids"] for p in batch], P, pad_id)
        rng, key = jax.random.split(rng)
        state, m, tr = trainer.iteration(state, toks, mask, key)
        m = {"iteration": it, **m}
        mf.write(json.dumps(m) + "\n")
        mf.flush()
        if writer is not None:
          for k, v in m.items():
            if k != "iteration":
              writer.add_scalar(k, v, it)
        if pc.log_samples_every and (it % int(pc.log_samples_every) == 0 or it == 1):
          _log_samples(sf, writer, tok, batch, tr, it, int(pc.num_logged_samples))
        bar.set_postfix(reward=f"{m['reward']:.3f}", kl=f"{m['kl']:.2f}",
                        beta=f"{m['beta']:.3g}")
        bar.update(1)
        last = m
        if it % int(pc.checkpoint_every) == 0 or it == total:
          mngr.save(it, state, {"iteration": it, "controller": trainer.controller_state(),
                                "prompts": mix.state_dict(),
                                "rng": np.asarray(jax.device_get(rng)).tolist()}, force=True)
  finally:
    bar.close()
    if writer is not None:
      writer.close()
    mngr.close()

  export_model(pcfg, state["policy"], tok, os.path.join(out, "final"))
  export_model(vcfg, state["value"], tok, os.path.join(out, "value_final"))
  plot_curves(metrics_path, os.path.join(out, "curves.png"))
  rows = list(utils.read_jsonl(metrics_path))
  summary = {
      "iterations": total,
      "reward_first": rows[0]["reward"] if rows else None,
      "reward_last": rows[-1]["reward"] if rows else None,
      "kl_last": rows[-1]["kl"] if rows else None,
      "kl_k3_last": rows[-1]["kl_k3"] if rows else None,
      "beta_last": last.get("beta", trainer.kl_ctl.beta),
      "policy": os.path.join(out, "final"),
      "value": os.path.join(out, "value_final"),
  }
  utils.mark_done(out, summary)
  return summary


def _log_samples(f, writer, tok, batch, tr, it: int, n: int) -> None:
  resp = np.asarray(jax.device_get(tr.response_tokens_BxN))
  rmask = np.asarray(jax.device_get(tr.response_mask_BxN))
  scores = np.asarray(jax.device_get(tr.scores_B))
  lines = []
  for i in range(min(n, len(batch))):
    text = tok.decode(resp[i][rmask[i]].tolist(), skip_special_tokens=False)
    prompt = tok.decode(batch[i]["ids"], skip_special_tokens=False)
    rec = {"iteration": it, "id": batch[i]["id"], "kind": batch[i]["kind"], "prompt": prompt,
           "response": text, "score": float(scores[i])}
    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    lines.append(f"**{batch[i]['kind']} {batch[i]['id']}** (score {scores[i]:.3f})\n\n{text}")
  f.flush()
  if writer is not None:
    writer.add_text("samples", "\n\n---\n\n".join(lines), it)

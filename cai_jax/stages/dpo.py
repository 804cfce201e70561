"""RL-CAI without a preference model: the DPO family on the soft AI labels.

Reads the label stage's comparisons (WORKDIR/label/preferences.jsonl, soft p_a)
and mixes in human comparisons from hh-rlhf files as the PM stage does. The
policy starts from the SL-CAI model, which is also the reference: its
log-probabilities of every response are computed once before training and
stored (reference_logprobs.json), so no second copy of the model is held while
training. `dpo.loss` picks the objective (`training.losses.preference_loss`):
"soft" takes the AI label as the target (the counterpart of the paper's soft PM
targets), "dpo" its rounded label, "ipo" IPO's squared loss.

Writes WORKDIR/dpo/: reference_logprobs.json, metrics.jsonl, tb/, checkpoints/
(a killed run resumes exactly), eval.json (held-out pairs: agreement of the
implicit reward margin with the labels), final/ (the policy, HF format), DONE.

  python -m cai_jax.main --config=configs/tiny.py --workdir=/tmp/cai \\
      --config.stages=revise,sft,label,dpo,evaluate
"""
from __future__ import annotations


import ml_collections
import numpy as np

from cai_jax import sharding as shd, utils
from cai_jax.runtime import StageContext, runners, stage_settings
from cai_jax.training import data, flops as flops_lib, losses, objectives, optim
from cai_jax.training import state as state_lib
from cai_jax.training.preferences import (dpo_logprobs, encode_pairs, read_comparisons,
                                          train_and_eval)
from cai_jax.utils import InputError

STAGE = "dpo"
USES = ("seed", "model", "dtype", "prompt_format")
VOLATILE = ("log_every", "checkpoint_every", "keep_checkpoints", "async_checkpoint",
            "tensorboard", "progress", "eval_every", "max_eval_pairs", "micro_batches")
REFERENCE_FILE = "reference_logprobs.json"


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.init_from = ""            # policy and reference: "" = WORKDIR/sft (when sft runs or ran),
                              # else config.model
  c.preferences = ""          # AI comparisons; "" = WORKDIR/label/preferences.jsonl; "none" = skip
  c.human_data = ()           # hh-rlhf jsonl(.gz) files of human (helpfulness) comparisons
  c.human_fraction = 0.5      # share of human comparisons in the training mixture (0..1)
  c.max_human_pairs = -1      # cap on human pairs read per file (-1 = all)
  c.loss = "soft"             # "soft": AI label p as the target; "dpo": p rounded; "ipo"
  c.beta = 0.1                # strength of the implicit KL to the reference
  c.max_len = 512             # tokens per prompt + response row (prompt end, response start kept)
  c.batch_size = 8            # pairs per step (global)
  c.micro_batches = 0         # 0: fitted to device memory (config.hbm_gib); k: k per step
  c.num_epochs = 1.0          # passes over the mixture
  c.max_steps = -1            # cap on steps; -1 = num_epochs worth
  c.eval_fraction = 0.1       # pairs of each source held out for the margin's agreement
  c.max_eval_pairs = -1       # evaluate on at most this many held-out pairs per source (-1 = all)
  c.train_top_layers = -1     # -1 trains everything; k trains the top k blocks + heads
  c.optim = optim.default_optim_config()  # AdamW
  c.optim.learning_rate = 1e-6
  c.eval_every = 0            # steps between evals; 0 = only at the end
  c.log_every = 10            # steps between progress-bar updates (metrics: every step)
  c.checkpoint_every = 100    # steps between Orbax checkpoints
  c.keep_checkpoints = 2      # checkpoints kept
  c.async_checkpoint = True   # write checkpoints in the background
  c.tensorboard = True        # TensorBoard scalars in WORKDIR/dpo/tb
  c.progress = True           # progress bar with tokens/s and MFU
  return c


def settings(config, workdir: str) -> dict:
  return stage_settings(config, workdir, STAGE, USES, VOLATILE)


def _reference(ctx, cfg, params, pairs, L, pad) -> None:
  """Fills each pair's ref_a / ref_b: read from the stage's file when an earlier
  (interrupted) run computed them, else computed with the initial params."""
  path = ctx.path(REFERENCE_FILE)
  stored = utils.read_json(path) if utils.exists(path) else None
  if stored is not None:
    lp = np.asarray(stored.get("logprobs", []), np.float32)
    if lp.shape != (len(pairs), 2):
      raise InputError(f"{path}: holds {lp.shape[0]} pairs' reference log-probs, the data has "
                       f"{len(pairs)}; rerun the stage (--rerun=dpo)")
  else:
    B = int(ctx.section.batch_size)
    lp = dpo_logprobs(cfg, params, pairs, L, pad, B, shd.mesh_from_config(ctx.config),
                      shd.rules_from_config(ctx.config))
    if ctx.is_main:
      utils.write_json(path, {"logprobs": lp.tolist()})
  for p, (a, b) in zip(pairs, lp):
    p.ref_a, p.ref_b = float(a), float(b)


def run(config, workdir: str) -> dict:
  ctx = StageContext(config, workdir, STAGE, default_config())
  dc = ctx.section
  done = ctx.done()
  if done is not None:
    return done
  L, B, seed = int(dc.max_len), int(dc.batch_size), ctx.seed
  if L < 2:
    raise InputError(f"config.dpo.max_len={L}: must be >= 2")
  ai, human = read_comparisons(dc, STAGE, ctx.stage_dir("label") + "/preferences.jsonl",
                               "the policy")
  init_path, cfg, params, tok = ctx.load_policy(dc.init_from, "dpo.init_from")
  enc = ctx.encoder(tok)
  ctx.begin(settings(config, workdir))

  train, eval_sets = train_and_eval(encode_pairs(enc, ai, L, seed, data.dpo_pair),
                                    encode_pairs(enc, human, L, seed, data.dpo_pair), dc, seed)
  if len(train) < B:
    raise InputError(f"config.dpo: {len(train)} training pairs cannot fill one batch of {B}; "
                     "lower config.dpo.batch_size or add comparisons")
  pad = tok.pad_token_id if tok.pad_token_id is not None else (cfg.pad_token_id or 0)
  # The reference is the initial policy: one pass over every pair before training.
  _reference(ctx, cfg, params, train + eval_sets["ai"] + eval_sets["human"], L, pad)

  beta, kind = float(dc.beta), str(dc.loss)
  mesh, rules = shd.mesh_from_config(config), shd.rules_from_config(config)

  def eval_fn(p, step):
    res = {}
    for src, pairs in eval_sets.items():
      if not pairs:
        continue
      lp = dpo_logprobs(cfg, p, pairs, L, pad, B, mesh, rules)
      margin = (lp[:, 0] - [x.ref_a for x in pairs]) - (lp[:, 1] - [x.ref_b for x in pairs])
      labels = np.asarray([x.p_a for x in pairs])
      decided = labels != 0.5
      agree = np.where(margin == 0, 0.5, (margin > 0) == (labels > 0.5))[decided]
      res[f"{src}_accuracy"] = float(agree.mean()) if agree.size else None
      res[f"{src}_loss"] = float(np.mean(losses.preference_loss(margin, labels, beta, kind)))
      res[f"{src}_margin"] = float(beta * margin.mean())
      res[f"{src}_pairs"] = len(pairs)
    return res

  make = lambda idx: data.dpo_batch([train[i] for i in idx], L, pad)  # noqa: E731
  batches = data.BatchIterator(data.ShuffledIndex(len(train), B, seed), make)
  steps = max(int(np.ceil(float(dc.num_epochs) * (len(train) // B))), 1)
  if int(dc.max_steps) > 0:
    steps = min(steps, int(dc.max_steps))
  res = runners.train(ctx, STAGE, cfg=cfg, params=params, tokenizer=tok, batches=batches,
                      example_batch=make(np.arange(B)), num_steps=steps,
                      loss_for=lambda c, s: objectives.dpo_loss_fn(c, beta, kind),
                      optim_config=dc.optim, sec=dc,
                      eval_fn=eval_fn if any(eval_sets.values()) else None,
                      flops_per_token=flops_lib.train_flops_per_token(
                          cfg, L, trainable_layers=int(dc.train_top_layers)),
                      trainable_layers=int(dc.train_top_layers))
  del params
  if res.evals and ctx.is_main:
    utils.write_json(ctx.path("eval.json"), res.evals[-1])
  ctx.export(cfg, res.state.params, tok)
  summary = {"loss": kind, "beta": beta, "steps": res.step, "num_ai_pairs": len(ai),
             "num_human_pairs": len(human), "num_train_pairs": len(train),
             "init_from": init_path, "resumed_from": res.resumed_from,
             "final_loss": res.history[-1]["loss"] if res.history else None,
             "eval": res.evals[-1] if res.evals else None,
             # Policy + optimizer state only: the reference lives in reference_logprobs.json.
             "resident_gib": {"train_state": state_lib.tree_bytes(res.state) / 2**30}}
  return ctx.finish(summary)

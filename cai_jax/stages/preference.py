"""Preference model: trunk + scalar head at the last token, soft ranking loss.

Reads the label stage's AI harmlessness comparisons (WORKDIR/label/
preferences.jsonl, soft p_a) and mixes in human comparisons from hh-rlhf
jsonl(.gz) files at a configured ratio. An optional PM-pretraining phase
first trains on hh-rlhf comparisons. Reports held-out pairwise accuracy and
calibration (expected calibration error of σ(r_a - r_b) against the labels)
and exports WORKDIR/pm/final/ (HF format with the score head and tokenizer).
Conversations are encoded by `text.conversation`, whose last token is where
the score is read, here, in PPO and in every evaluation.

The paper mixes the AI harmlessness labels with human helpfulness comparisons;
without `human_data` the PM learns harmlessness alone, and its summary says so.

  python -m cai_jax.main --config=configs/tiny.py --workdir=/tmp/cai \\
      --config.stages=pm
"""
from __future__ import annotations


import jax
import ml_collections
import numpy as np

from cai_jax import constitution as constitution_lib
from cai_jax import models, sharding as shd, utils
from cai_jax.runtime import StageContext, parse_list, runners, stage_settings
from cai_jax.training import checkpoint, data, flops as flops_lib, objectives, optim
from cai_jax.training import state as state_lib
from cai_jax.training.preferences import (axis_labels, encode_pairs, evaluate_pairs,
                                          read_comparisons, read_human_pairs, train_and_eval)
from cai_jax.utils import InputError

STAGE = "pm"
USES = ("seed", "model", "dtype", "prompt_format")
VOLATILE = ("log_every", "checkpoint_every", "keep_checkpoints", "async_checkpoint",
            "tensorboard", "progress", "eval_every", "calibration_bins", "max_eval_pairs",
            "require_human_data", "micro_batches")


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.init_from = ""            # "" = WORKDIR/sft (when sft runs or ran), else config.model
  c.preferences = ""          # AI comparisons; "" = WORKDIR/label/preferences.jsonl; "none" = skip
  c.human_data = ()           # hh-rlhf jsonl(.gz) files of human (helpfulness) comparisons
  c.human_fraction = 0.5      # share of human comparisons in the training mixture (0..1)
  c.require_human_data = False  # refuse to start without human_data unless human_fraction=0
  c.max_human_pairs = -1      # cap on human pairs read per file (-1 = all)
  c.pretrain_data = ()        # hh-rlhf files for PM pretraining (() = no phase)
  c.pretrain_steps = 0        # PM-pretraining steps (0 = no phase)
  c.pretrain_lr = 1e-5        # learning rate of the pretraining phase
  c.eval_fraction = 0.1       # pairs of each source held out for accuracy/calibration
  c.max_eval_pairs = -1       # evaluate on at most this many held-out pairs per source (-1 = all)
  c.max_len = 512             # tokens per response sequence (the end is kept)
  c.batch_size = 8            # pairs per step (global)
  c.micro_batches = 0         # 0: fitted to device memory (config.hbm_gib); k: k per step
  c.num_epochs = 1.0          # passes over the mixture
  c.max_steps = -1            # cap on fine-tuning steps; -1 = num_epochs worth
  c.train_top_layers = -1     # -1 trains everything; k trains top k blocks + final norm + head
  c.score_init_std = 0.0      # scalar head init (0 = start from r = bias for every input)
  # one score head per axis of the constitution, each trained on its axis's AI labels
  # (label.per_axis) and, for human_axis, on the human comparisons
  c.per_axis_heads = False
  c.human_axis = "helpfulness"  # the axis the human (helpfulness) comparisons train
  c.calibration_bins = 10     # bins for the expected calibration error
  c.eval_every = 0            # steps between evals; 0 = only at the end
  c.log_every = 10            # steps between progress-bar updates (metrics: every step)
  c.optim = optim.default_optim_config()  # AdamW for the fine-tuning phase
  c.checkpoint_every = 100    # steps between Orbax checkpoints
  c.keep_checkpoints = 2      # checkpoints kept per phase
  c.async_checkpoint = True   # write checkpoints in the background
  c.tensorboard = True        # TensorBoard scalars in WORKDIR/pm/tb
  c.progress = True           # progress bar with tokens/s and MFU
  return c


def settings(config, workdir: str) -> dict:
  extra = None
  if config.pm.get("per_axis_heads", False):  # the heads are the constitution's axes
    const = constitution_lib.load(config.get("constitution", "harmlessness"))
    # Named to sort after the config fields: a refused resume names the field first.
    extra = {"sha_of_constitution_axes": const.axes_fingerprint()}
  return stage_settings(config, workdir, STAGE, USES, VOLATILE, extra)


def check_config(config) -> None:
  """Before any stage runs: the paper's config needs human comparisons."""
  pc = config.pm
  if pc.get("require_human_data", False) and not parse_list(pc.human_data) and \
      float(pc.human_fraction) > 0:
    raise InputError("config.pm.human_data is empty: the paper's PM mixes human helpfulness "
                     "comparisons with the AI labels; give hh-rlhf helpful-* files "
                     "(configs/paper.py:...,human_data=FILE) or set --config.pm.human_fraction=0 "
                     "to train on AI labels alone")


# ------------------------------------------------------------------ phases
def _train_phase(ctx, name, cfg, params, tok, train_pairs, eval_sets, steps, lr):
  """One training phase (its own checkpoints and metrics); returns (params, result)."""
  pc = ctx.section
  L, B = int(pc.max_len), int(pc.batch_size)
  mesh, rules = shd.mesh_from_config(ctx.config), shd.rules_from_config(ctx.config)
  pad = tok.pad_token_id if tok.pad_token_id is not None else (cfg.pad_token_id or 0)
  if len(train_pairs) < B:
    raise InputError(f"{name}: {len(train_pairs)} training pairs cannot fill one batch of {B}; "
                     "lower config.pm.batch_size or add comparisons")
  make = lambda idx: data.pair_batch([train_pairs[i] for i in idx], L, pad)  # noqa: E731
  batches = data.BatchIterator(data.ShuffledIndex(len(train_pairs), B, ctx.seed), make)
  oc = ml_collections.ConfigDict(pc.optim.to_dict())
  oc.learning_rate = lr

  def eval_fn(p, step):
    res = {}
    for src, pairs in eval_sets.items():
      if pairs:
        ev = evaluate_pairs(cfg, p, pairs, L, pad, B, mesh, rules, int(pc.calibration_bins))
        res.update({f"{src}_{k}": v for k, v in ev.items() if k != "calibration_bins"})
        res[f"{src}_calibration_bins"] = ev["calibration_bins"]
    return res

  res = runners.train(ctx, name, cfg=cfg, params=params, tokenizer=tok, batches=batches,
                      example_batch=make(np.arange(B)), num_steps=steps,
                      loss_for=lambda c, s: objectives.pm_loss_fn(c), optim_config=oc, sec=pc,
                      eval_fn=eval_fn if any(eval_sets.values()) else None,
                      flops_per_token=flops_lib.train_flops_per_token(
                          cfg, L, lm_head=False, trainable_layers=int(pc.train_top_layers)),
                      trainable_layers=int(pc.train_top_layers))
  return res.state.params, res


def _steps(n_pairs, B, epochs, cap):
  s = max(int(np.ceil(float(epochs) * (n_pairs // B))), 1)
  return min(s, int(cap)) if int(cap) > 0 else s


def run(config, workdir: str) -> dict:
  ctx = StageContext(config, workdir, STAGE, default_config())
  pc = ctx.section
  done = ctx.done()
  if done is not None:
    return done
  L, seed = int(pc.max_len), ctx.seed
  B = int(pc.batch_size)
  if L < 2:
    raise InputError(f"config.pm.max_len={L}: must be >= 2")
  label_file = ctx.stage_dir("label") + "/preferences.jsonl"
  ai, human = read_comparisons(pc, STAGE, label_file, "the PM")
  pretrain = read_human_pairs(pc.pretrain_data) if int(pc.pretrain_steps) > 0 else []
  axes = ()
  if pc.per_axis_heads:
    const = constitution_lib.load(config.get("constitution", "harmlessness"))
    axes = tuple(const.axis_names)
    if not axes:
      raise InputError(f"config.pm.per_axis_heads: constitution {const.name!r} has no axes; "
                       "give one with axes (constitutions/README.md) or per_axis_heads=False")
    axis_labels(ai, human + pretrain, axes, str(pc.human_axis), pc.preferences or label_file)
  init_path = ctx.role_spec("policy", pc.init_from)
  cfg, params, tok = ctx.load(init_path, field="pm.init_from")
  cfg = cfg.replace(score_labels=axes)  # a head per axis, or the scalar head
  params = models.add_score_head(cfg, models.drop_heads(params, ()), jax.random.PRNGKey(seed),
                                 init_std=float(pc.score_init_std))
  enc = ctx.encoder(tok)
  ctx.begin(settings(config, workdir))

  train, eval_sets = train_and_eval(encode_pairs(enc, ai, L, seed),
                                    encode_pairs(enc, human, L, seed), pc, seed)

  summary = {"num_ai_pairs": len(ai), "num_human_pairs": len(human), "num_train_pairs": len(train),
             "init_from": init_path, "human_data": bool(human), "axes": list(axes)}
  ft_dir = ctx.path("checkpoints")
  ft_started = False
  if utils.isdir(ft_dir):
    m = checkpoint.Manager(ft_dir, read_only=True)
    ft_started = m.latest_step() is not None
    m.close()
  if pretrain and not ft_started:
    pre = encode_pairs(enc, pretrain, L, seed + 1)
    params, pres = _train_phase(ctx, "pmp", cfg, params, tok, pre, {}, int(pc.pretrain_steps),
                                float(pc.pretrain_lr))
    params = state_lib.to_host(params)
    summary["pretrain"] = {"steps": pres.step, "num_pairs": len(pre),
                           "final_loss": pres.history[-1]["loss"] if pres.history else None}
  steps = _steps(len(train), B, pc.num_epochs, pc.max_steps)
  params, res = _train_phase(ctx, STAGE, cfg, params, tok, train, eval_sets, steps,
                             float(pc.optim.learning_rate))
  summary.update({"steps": res.step, "resumed_from": res.resumed_from,
                  "final_loss": res.history[-1]["loss"] if res.history else None,
                  "eval": {k: v for k, v in (res.evals[-1] if res.evals else {}).items()
                           if not k.endswith("calibration_bins")}})
  if res.evals and ctx.is_main:
    utils.write_json(ctx.path("eval.json"), res.evals[-1])
  ctx.export(cfg, params, tok)
  return ctx.finish(summary)

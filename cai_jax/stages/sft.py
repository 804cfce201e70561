"""SL-CAI: fine-tune on the revisions (+ helpful samples).

Reads WORKDIR/revise/records.jsonl (+ helpful.jsonl), builds SL-CAI-n
examples (revisions of rounds 1..n with their red-team prompts, plus the
helpful model's own samples), trains with the loss on response tokens only at
a constant learning rate for one epoch (all configurable), and exports
WORKDIR/sft/final/ (HF format with the tokenizer).

The paper fine-tunes a *pretrained* model on this data; `init_from` names the
model to fine-tune ("" = config.model, the helpful model that wrote the
revisions; configs/paper.py takes a pretrained model as `pretrained=`).

  python -m cai_jax.main --config=configs/tiny.py --workdir=/tmp/cai \\
      --config.stages=sft
"""
from __future__ import annotations


import jax
import ml_collections
import numpy as np

from cai_jax import models, utils
from cai_jax.models import lora
from cai_jax.runtime import StageContext, runners, stage_settings
from cai_jax.training import data, flops as flops_lib, loop, objectives, optim
from cai_jax.utils import InputError

STAGE = "sft"
USES = ("seed", "model", "dtype", "prompt_format")
VOLATILE = ("log_every", "checkpoint_every", "keep_checkpoints", "async_checkpoint",
            "tensorboard", "progress", "eval_every", "use_tfds", "micro_batches")


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.init_from = ""            # model to fine-tune: "" = config.model (paper: a pretrained model)
  c.revise_dir = ""           # "" = WORKDIR/revise (records.jsonl + helpful.jsonl)
  c.num_rounds = -1           # SL-CAI-n: revisions of rounds 1..n; -1 = every round
  c.include_helpful = True    # also train on the helpful model's samples (as the paper does)
  c.use_tfds = False          # read the revise records through the TFDS array_record builder
  c.max_len = 512             # tokens per row (prompt left-truncated, response cut at the end)
  c.batch_size = 8            # rows per step (global; divisible by the data-parallel size)
  c.packing = False           # pack several examples per row (attention kept per example)
  c.num_epochs = 1.0          # passes over the data (the paper: one)
  c.max_steps = -1            # cap on steps; -1 = num_epochs worth
  c.eval_fraction = 0.05      # examples held out for the eval loss (0 = none)
  c.eval_every = 0            # steps between evals; 0 = only at the end
  c.log_every = 10            # steps between progress-bar updates (metrics: every step)
  c.logits_chunk = 0          # LM-head block length; > 0 recomputes its logits in backward
  c.micro_batches = 0         # 0: fitted to device memory (config.hbm_gib); k: k per step
  c.train_top_layers = -1     # -1 trains everything; k trains the top k blocks + heads
  c.lora = lora.default_config()  # lora.rank > 0: train rank-r adapters only (export merged)
  c.optim = optim.default_optim_config()  # AdamW; constant lr as in the paper's SL stage
  c.checkpoint_every = 100    # steps between Orbax checkpoints
  c.keep_checkpoints = 2      # checkpoints kept
  c.async_checkpoint = True   # write checkpoints in the background
  c.tensorboard = True        # TensorBoard scalars in WORKDIR/sft/tb
  c.progress = True           # progress bar with tokens/s and MFU
  return c


def settings(config, workdir: str) -> dict:
  return stage_settings(config, workdir, STAGE, USES, VOLATILE)


def build_examples(sc, revise_dir: str) -> list[dict]:
  from cai_jax.data import slcai
  n = None if sc.num_rounds is None or int(sc.num_rounds) < 0 else int(sc.num_rounds)
  exs = list(slcai.sl_cai_examples(revise_dir, n, bool(sc.include_helpful), bool(sc.use_tfds)))
  if not exs:
    raise InputError(f"{revise_dir}: no SL-CAI examples (no non-empty revisions or helpful "
                     "responses); check the revise stage's output")
  return exs


def run(config, workdir: str) -> dict:
  ctx = StageContext(config, workdir, STAGE, default_config())
  sc = ctx.section
  done = ctx.done()
  if done is not None:
    return done
  revise_dir = sc.revise_dir or ctx.stage_dir("revise")
  if not utils.exists(utils.join(revise_dir, "records.jsonl")):
    raise InputError(f"{revise_dir}/records.jsonl: revise records not found; run the revise "
                     "stage first (config.stages includes revise) or set config.sft.revise_dir")
  L, B = int(sc.max_len), int(sc.batch_size)
  if L < 2:
    raise InputError(f"config.sft.max_len={L}: must be >= 2")
  # A resumed run rebuilds the configured model, then the loop restores its
  # checkpoint (checking that the shapes match this model).
  init_spec = ctx.role_spec("initial", sc.init_from)
  cfg, params, tok = ctx.load(init_spec, field="sft.init_from")
  params = models.drop_heads(params, ("lm",))
  if lora.enabled(sc):
    params = lora.add(params, int(sc.lora.rank), float(sc.lora.alpha), tuple(sc.lora.targets),
                      jax.random.PRNGKey(ctx.seed + 3))
  enc = ctx.encoder(tok)
  raw = build_examples(sc, revise_dir)
  ctx.begin(settings(config, workdir))

  examples = [data.sft_example(enc, e["prompt"], e["response"], L) for e in raw]
  tr_idx, ev_idx = data.split_eval(len(examples), float(sc.eval_fraction), ctx.seed)
  train_ex = [examples[i] for i in tr_idx]
  eval_ex = [examples[i] for i in ev_idx]
  pad = tok.pad_token_id if tok.pad_token_id is not None else (cfg.pad_token_id or 0)
  packed = bool(sc.packing)
  if packed:
    order = np.random.default_rng([ctx.seed, 99]).permutation(len(train_ex))
    train_ex = [train_ex[i] for i in order]
    rows = data.pack_sft(train_ex, L)
  else:
    rows = [[i] for i in range(len(train_ex))]
  if len(rows) < B:
    raise InputError(f"{revise_dir}: {len(rows)} training rows cannot fill one batch of {B}; "
                     "lower config.sft.batch_size or produce more revisions")
  make = lambda idx: data.sft_batch(train_ex, [rows[i] for i in idx], L, pad, packed)  # noqa: E731
  batches = data.BatchIterator(data.ShuffledIndex(len(rows), B, ctx.seed), make)
  steps = int(np.ceil(float(sc.num_epochs) * batches.index.batches_per_epoch))
  if int(sc.max_steps) > 0:
    steps = min(steps, int(sc.max_steps))
  steps = max(steps, 1)

  loss_fn = objectives.sft_loss_fn(cfg, int(sc.logits_chunk))
  eval_fn = None
  if eval_ex:
    from cai_jax import sharding as shd
    eval_batches = [data.sft_batch(eval_ex, [[j] for j in range(i, min(i + B, len(eval_ex)))]
                                   + [[]] * max(0, i + B - len(eval_ex)), L, pad)
                    for i in range(0, len(eval_ex), B)]
    eval_fn = loop.make_eval_fn(
        lambda p, b: dict(zip(("loss", "loss_tokens"), _pair(loss_fn(p, b, None)))),
        eval_batches, shd.mesh_from_config(config), weight_key="loss_tokens",
        rules=shd.rules_from_config(config))
  res = runners.train(ctx, STAGE, cfg=cfg, params=params, tokenizer=tok, batches=batches,
                      example_batch=make(np.arange(B)), num_steps=steps,
                      loss_for=lambda c, s: objectives.sft_loss_fn(c, s.logits_chunk),
                      logits_chunk=int(sc.logits_chunk), optim_config=sc.optim, sec=sc,
                      eval_fn=eval_fn,
                      flops_per_token=flops_lib.train_flops_per_token(
                          cfg, L, trainable_layers=int(sc.train_top_layers)),
                      trainable_layers=int(sc.train_top_layers))
  del params
  ctx.export(cfg, lora.merge(res.state.params), tok)
  if lora.KEY in res.state.params:  # also the adapters alone, for PEFT on the base
    ctx.export_adapter(cfg, res.state.params, init_spec)
  summary = {"steps": res.step, "num_examples": len(raw), "num_train_rows": len(rows),
             "num_eval_examples": len(eval_ex),
             "final_loss": res.history[-1]["loss"] if res.history else None,
             "eval": res.evals[-1] if res.evals else None,
             "resumed_from": res.resumed_from}
  return ctx.finish(summary)


def _pair(x):
  loss, aux = x
  return loss, aux["loss_tokens"]

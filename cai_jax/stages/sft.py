"""SL-CAI: fine-tune the initial model on revisions (+ helpful samples).

Reads WORKDIR/revise/records.jsonl (+ helpful.jsonl), builds SL-CAI-n
examples (revisions of rounds 1..n with their red-team prompts, plus the
helpful model's own samples), trains with the loss on response tokens only at
a constant learning rate for one epoch (all configurable), and exports
WORKDIR/sft/final/ (HF format with the tokenizer). Checkpoints live in
WORKDIR/sft/checkpoints/; an interrupted run resumes exactly.

  python -m cai_jax.main --config=configs/tiny.py --workdir=/tmp/cai \\
      --config.stages=sft
"""
from __future__ import annotations

import logging
import os
import shutil

import jax
import ml_collections
import numpy as np

from cai_jax import models, sharding as shd, utils
from cai_jax.training import checkpoint, data, loop, objectives, optim
from cai_jax.training import init as init_lib
from cai_jax.training import state as state_lib
from cai_jax.utils import InputError


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.init_from = ""            # "" = config.model; HF dir | .gguf | "smollm2" | a stage dir
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
  c.log_every = 10            # steps between progress/TensorBoard updates
  c.logits_chunk = 0          # LM-head block length; > 0 recomputes its logits in backward
  c.train_top_layers = -1     # -1 trains everything; k trains the top k blocks + heads
  c.optim = optim.default_optim_config()  # AdamW; constant lr as in the paper's SL stage
  c.checkpoint_every = 100    # steps between Orbax checkpoints
  c.keep_checkpoints = 2      # checkpoints kept
  c.async_checkpoint = True   # write checkpoints in the background
  c.tensorboard = True        # TensorBoard scalars in WORKDIR/sft/tb
  c.progress = True           # progress bar with tokens/s and MFU
  return c


def _fail_missing(path: str, what: str) -> None:
  if not os.path.exists(path):
    raise InputError(f"{path}: {what} not found; run the revise stage first "
                     "(config.stages includes revise) or set config.sft.revise_dir")


def build_examples(config, tok, revise_dir: str) -> list[dict]:
  from cai_jax.data import slcai
  sc = config.sft
  n = None if sc.num_rounds is None or int(sc.num_rounds) < 0 else int(sc.num_rounds)
  exs = list(slcai.sl_cai_examples(revise_dir, n, bool(sc.include_helpful), bool(sc.use_tfds)))
  if not exs:
    raise InputError(f"{revise_dir}: no SL-CAI examples (no non-empty revisions or helpful "
                     "responses); check the revise stage's output")
  return exs


def split_eval(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Deterministic (train, eval) index split."""
  perm = np.random.default_rng([seed, 1234]).permutation(n)
  k = int(round(n * fraction)) if fraction > 0 else 0
  k = min(k, n - 1)
  return np.sort(perm[k:]), np.sort(perm[:k])


def export_final(cfg, params, tok, out_dir: str) -> None:
  """HF export written under a temporary name, then renamed. Call on every
  process (the params are gathered); process 0 writes."""
  params = state_lib.to_host(params)
  if jax.process_index() != 0:
    return
  tmp = out_dir + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  models.save_pretrained(cfg, params, tmp, tokenizer=tok)
  shutil.rmtree(out_dir, ignore_errors=True)
  os.replace(tmp, out_dir)


def tensorboard_writer(enabled: bool, logdir: str):
  if not enabled or jax.process_index() != 0:
    return None
  from tensorboardX import SummaryWriter
  return SummaryWriter(logdir)


def run(config, workdir: str) -> dict:
  sc = config.sft
  out = os.path.join(workdir, "sft")
  done = utils.done_info(out)
  if done is not None:
    return done
  revise_dir = sc.revise_dir or os.path.join(workdir, "revise")
  _fail_missing(os.path.join(revise_dir, "records.jsonl"), "revise records")
  ckpt_dir = os.path.join(out, "checkpoints")
  # A resumed run rebuilds the configured model, then the loop restores its
  # checkpoint (checking that the shapes match this model).
  cfg, params, tok = init_lib.load_init(sc.init_from or config.model, seed=config.seed,
                                        dtype=config.dtype)
  params = models.drop_heads(params, ("lm",))
  fmt, L = config.prompt_format, int(sc.max_len)

  raw = build_examples(config, tok, revise_dir)
  enc = [data.encode_sft(tok, e["prompt"], e["response"], fmt, L) for e in raw]
  tr_idx, ev_idx = split_eval(len(enc), float(sc.eval_fraction), config.seed)
  train_ex = [enc[i] for i in tr_idx]
  eval_ex = [enc[i] for i in ev_idx]
  pad = tok.pad_token_id if tok.pad_token_id is not None else (cfg.pad_token_id or 0)
  packed = bool(sc.packing)
  if packed:
    order = np.random.default_rng([config.seed, 99]).permutation(len(train_ex))
    ordered = [train_ex[i] for i in order]
    rows = data.pack_sft(ordered, L)
    train_ex = ordered
  else:
    rows = [[i] for i in range(len(train_ex))]

  mesh = shd.mesh_from_config(config)
  rules = shd.rules_from_config(config)
  B = int(sc.batch_size)
  if B % shd.batch_divisor(mesh, rules):
    raise InputError(f"config.sft.batch_size={B} is not divisible by the data-parallel size "
                     f"{shd.batch_divisor(mesh, rules)} of mesh {dict(mesh.shape)}")
  if len(rows) < B:
    raise InputError(f"{revise_dir}: {len(rows)} training rows cannot fill one batch of {B}; "
                     "lower config.sft.batch_size or produce more revisions")
  make = lambda idx: data.sft_batch(train_ex, [rows[i] for i in idx], L, pad, packed)  # noqa: E731
  batches = data.BatchIterator(data.ShuffledIndex(len(rows), B, config.seed), make)
  steps = int(np.ceil(float(sc.num_epochs) * batches.index.batches_per_epoch))
  if int(sc.max_steps) > 0:
    steps = min(steps, int(sc.max_steps))
  steps = max(steps, 1)

  tx = optim.make_optimizer(sc.optim, total_steps=steps)
  trainable = None
  if int(sc.train_top_layers) >= 0:
    trainable = optim.trainable_mask(params, int(sc.train_top_layers), train_embeddings=False)
    tx = optim.make_optimizer(sc.optim, total_steps=steps, trainable=trainable)
  st = state_lib.create_train_state(params, tx, cfg, mesh, rules)
  del params
  loss_fn = objectives.sft_loss_fn(cfg, int(sc.logits_chunk))
  step_fn = loop.make_train_step(loss_fn, tx, st, mesh, make(np.arange(B)), trainable)
  eval_batches = [data.sft_batch(eval_ex, [[j] for j in range(i, min(i + B, len(eval_ex)))]
                                 + [[]] * max(0, i + B - len(eval_ex)), L, pad)
                  for i in range(0, len(eval_ex), B)]
  eval_fn = loop.make_eval_fn(
      lambda p, b: dict(zip(("loss", "loss_tokens"), _pair(loss_fn(p, b, None)))),
      eval_batches, mesh, weight_key="loss_tokens", rules=rules)

  init_lib.prepare_checkpoint_dir(ckpt_dir, cfg, tok)
  mngr = checkpoint.Manager(ckpt_dir, max_to_keep=int(sc.keep_checkpoints),
                            save_interval_steps=int(sc.checkpoint_every),
                            async_save=bool(sc.async_checkpoint))
  writer = tensorboard_writer(bool(sc.tensorboard), os.path.join(out, "tb"))
  from cai_jax.training import flops as flops_lib
  try:
    res = loop.train(step_fn=step_fn, state=st, batches=batches, mesh=mesh, num_steps=steps,
                     rng=jax.random.PRNGKey(config.seed), manager=mngr, eval_fn=eval_fn,
                     eval_every=int(sc.eval_every), writer=writer,
                     flops_per_token=flops_lib.train_flops_per_token(
                         cfg, L, trainable_layers=int(sc.train_top_layers)),
                     log_every=int(sc.log_every), desc="sft", progress=bool(sc.progress),
                     rules=rules)
  finally:
    mngr.close()
    if writer is not None:
      writer.close()
  export_final(cfg, res.state.params, tok, os.path.join(out, "final"))
  summary = {"steps": res.step, "num_examples": len(raw), "num_train_rows": len(rows),
             "num_eval_examples": len(eval_ex),
             "final_loss": res.history[-1]["loss"] if res.history else None,
             "eval": res.evals[-1] if res.evals else None,
             "resumed_from": res.resumed_from}
  logging.info("sft: %s", summary)
  if jax.process_index() == 0:
    utils.mark_done(out, summary)
  return summary


def _pair(x):
  loss, aux = x
  return loss, aux["loss_tokens"]

"""Optimizer builder shared by SFT, the preference model and PPO.

`make_optimizer(cfg)` turns a small ConfigDict (see `default_optim_config`)
into an optax GradientTransformation: AdamW with a learning-rate schedule,
global-norm clipping, optional gradient accumulation (optax.MultiSteps) and an
optional mask that freezes parameters (e.g. train only the top layers).
"""
from __future__ import annotations

import re
from typing import Callable, Optional

import jax
import ml_collections
import optax

from cai_jax.utils import InputError


def default_optim_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.learning_rate = 1e-5        # peak learning rate
  c.schedule = "constant"       # "constant" (the paper's SL), "cosine", "linear"
  c.warmup_steps = 0            # linear warmup from 0 to the peak
  c.decay_steps = 0             # steps of the cosine/linear decay (0 = total steps)
  c.end_lr_fraction = 0.0       # final lr as a fraction of the peak (cosine/linear)
  c.b1 = 0.9                    # AdamW beta1
  c.b2 = 0.95                   # AdamW beta2
  c.eps = 1e-8                  # AdamW epsilon
  c.weight_decay = 0.0          # decoupled weight decay (not applied to norms/biases)
  c.grad_clip = 1.0             # global-norm clipping; 0 disables
  c.grad_accum_steps = 1        # micro-batches per optimizer update (optax.MultiSteps)
  return c


def make_schedule(cfg, total_steps: int = 0) -> optax.Schedule:
  """Learning-rate schedule from the config; total_steps fills decay_steps=0."""
  lr = float(cfg.learning_rate)
  warm = int(cfg.get("warmup_steps", 0))
  kind = cfg.get("schedule", "constant")
  decay = int(cfg.get("decay_steps", 0)) or max(int(total_steps) - warm, 1)
  end = lr * float(cfg.get("end_lr_fraction", 0.0))
  if kind == "constant":
    main = optax.constant_schedule(lr)
  elif kind == "cosine":
    main = optax.cosine_decay_schedule(lr, decay, alpha=end / lr if lr else 0.0)
  elif kind == "linear":
    main = optax.linear_schedule(lr, end, decay)
  else:
    raise InputError(f"optimizer schedule {kind!r} unknown; use constant, cosine or linear")
  if warm <= 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), main], [warm])


def _decay_mask(params):
  # Weight decay on matrices only: norms, biases and the scalar score bias keep theirs.
  return jax.tree_util.tree_map(lambda x: getattr(x, "ndim", 0) >= 2, params)


def make_optimizer(cfg, total_steps: int = 0,
                   trainable: Optional[Callable] = None) -> optax.GradientTransformation:
  """AdamW + schedule + clipping (+ accumulation, + frozen-parameter mask).

  `trainable`: optional params-shaped bool tree (or a function params -> tree);
  False leaves get no update and no optimizer state worth speaking of.
  """
  sched = make_schedule(cfg, total_steps)
  parts = []
  if float(cfg.get("grad_clip", 0.0)) > 0:
    parts.append(optax.clip_by_global_norm(float(cfg.grad_clip)))
  parts.append(optax.adamw(sched, b1=float(cfg.b1), b2=float(cfg.b2), eps=float(cfg.eps),
                           weight_decay=float(cfg.get("weight_decay", 0.0)), mask=_decay_mask))
  tx = optax.chain(*parts)
  if trainable is not None:
    label = lambda p: jax.tree_util.tree_map(  # noqa: E731
        lambda t: "train" if t else "freeze", trainable(p) if callable(trainable) else trainable)
    tx = optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, label)
  k = int(cfg.get("grad_accum_steps", 1))
  if k > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=k)
  return tx


def trainable_mask(params, train_top_layers: int = -1, train_embeddings: bool = True,
                   extra_patterns: tuple = ()):
  """Bool tree: which parameters are trained.

  train_top_layers=-1 trains everything; k>=0 trains only the top k blocks, the
  final norm and the heads (`score_*`, and `lm_head` when untied), freezing the
  embedding unless `train_embeddings` (a tied embedding is the LM head, so
  freezing it is the usual choice when training the top layers of an LM).
  `extra_patterns`: regexes on "a/b/c" paths that are always trained.
  """
  if train_top_layers is None or train_top_layers < 0:
    return jax.tree_util.tree_map(lambda _: True, params)
  layer_ids = sorted(int(k.split("_")[1]) for k in params if re.fullmatch(r"layers_\d+", k))
  top = set(layer_ids[len(layer_ids) - train_top_layers:]) if train_top_layers else set()
  pats = [re.compile(p) for p in extra_patterns]

  def one(path, _):
    keys = [getattr(p, "key", str(p)) for p in path]
    name = "/".join(str(k) for k in keys)
    head = keys[0]
    if any(p.search(name) for p in pats):
      return True
    if head.startswith("layers_"):
      return int(head.split("_")[1]) in top
    if head == "embedding":
      return bool(train_embeddings)
    return True  # final_norm, lm_head, score_kernel, score_bias
  return jax.tree_util.tree_map_with_path(one, params)


def is_frozen_everywhere(mask) -> bool:
  return not any(jax.tree_util.tree_leaves(mask))

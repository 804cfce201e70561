"""LoRA adapters: low-rank updates W + (alpha / rank) A B of chosen projections.

The adapters live in the params tree under "lora", mirroring the layers they
adapt ({"layers_3": {"attn": {"q_kernel": {"a": ..., "b": ...}}}, "scale": s}),
so they travel with the params through sharding, checkpoints and the scanned
layout. `models.forward` hands them to the model as the "lora" collection
(`variables`), where each adapted projection adds x A B beside its frozen kernel:
every loss, scorer and sampler sees the adapted model, and no adapted copy of a
kernel exists (a merged one per layer would cost the memory LoRA saves; the
rollout merges once, where decoding pays per step); training marks only the
adapters (and a scoring model's head) trainable, so only they carry optimizer
state, and the base is read, never updated. `base(params)` is the model without
adapters (PPO's reference); `merge(params)` is the adapted model with ordinary
weights (the export).
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections

KEY = "lora"
# target name -> (block, kernel, number of the kernel's leading input dims)
TARGETS = {"q": ("attn", "q_kernel", 1), "k": ("attn", "k_kernel", 1),
           "v": ("attn", "v_kernel", 1), "o": ("attn", "o_kernel", 2),
           "gate": ("mlp", "gate_kernel", 1), "up": ("mlp", "up_kernel", 1),
           "down": ("mlp", "down_kernel", 1)}


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.rank = 0                  # 0: full fine-tuning; r > 0: rank-r adapters, the rest frozen
  c.alpha = 16.0              # the update is scaled by alpha / rank
  c.targets = ("q", "k", "v", "o", "gate", "up", "down")  # projections adapted in every layer
  return c


def enabled(section) -> bool:
  lc = section.get(KEY, None) if section is not None else None
  return lc is not None and int(lc.rank) > 0


def _layer_keys(params) -> list:
  return sorted(k for k in params if k.startswith("layers_"))


def add(params, rank: int, alpha: float, targets: Sequence[str], rng):
  """params with fresh adapters: A ~ N(0, 1/fan_in), B = 0, so the adapted model
  starts equal to the base."""
  bad = sorted(set(targets) - set(TARGETS))
  if bad or not targets:
    raise ValueError(f"lora targets {bad or '()'}: choose from {', '.join(TARGETS)}")
  lora = {"scale": jnp.float32(alpha / rank)}
  keys = iter(jax.random.split(rng, len(_layer_keys(params)) * len(targets)))
  for layer in _layer_keys(params):
    lead = 1 if layer == "layers_stack" else 0
    for t in targets:
      block, name, nin = TARGETS[t]
      w = params[layer][block][name]
      pre, ins, outs = w.shape[:lead], w.shape[lead:lead + nin], w.shape[lead + nin:]
      a = jax.random.normal(next(keys), pre + ins + (rank,), jnp.float32) / math.sqrt(
          math.prod(ins))
      b = jnp.zeros(pre + (rank,) + outs, jnp.float32)
      lora.setdefault(layer, {}).setdefault(block, {})[name] = {"a": a.astype(w.dtype),
                                                                 "b": b.astype(w.dtype)}
  return dict(params, **{KEY: lora})


def _delta(w, a, b):
  """A B in the shape of w (with a leading layer dim for the scanned layout)."""
  lead = a.ndim + b.ndim - w.ndim - 2
  pre = w.shape[:lead]
  r = a.shape[-1]
  a2 = a.reshape(pre + (-1, r)).astype(jnp.float32)
  b2 = b.reshape(pre + (r, -1)).astype(jnp.float32)
  return (a2 @ b2).reshape(w.shape)


def variables(params) -> dict:
  """Flax variables for `params`: {"params": base, "lora": adapters with B scaled
  by alpha/rank} (what `transformer.adapted` reads), or {"params": params}."""
  if KEY not in params:
    return {"params": params}
  ad = dict(params[KEY])
  scale = ad.pop("scale")
  ad = jax.tree_util.tree_map_with_path(
      lambda path, x: x * scale.astype(x.dtype) if getattr(path[-1], "key", None) == "b" else x,
      ad)
  return {"params": base(params), KEY: ad}


def merge(params):
  """The adapted model with ordinary weights (no "lora" entry); params unchanged
  when they have no adapters."""
  if KEY not in params:
    return params
  p = dict(params)
  lora = p.pop(KEY)
  scale = lora["scale"]
  for layer, blocks in lora.items():
    if layer == "scale":
      continue
    p[layer] = dict(p[layer])
    for block, kernels in blocks.items():
      p[layer][block] = dict(p[layer][block])
      for name, ab in kernels.items():
        w = p[layer][block][name]
        p[layer][block][name] = (w.astype(jnp.float32)
                                 + scale * _delta(w, ab["a"], ab["b"])).astype(w.dtype)
  return p


def base(params):
  """The model without its adapters (the same arrays, no copy)."""
  return {k: v for k, v in params.items() if k != KEY}


def cast_base(params, dtype):
  """params with the frozen base (all but the adapters and a score head) in
  `dtype`: a LoRA model's base is only read, like a reference model."""
  mask = trainable_mask(params)
  return {k: v if k == KEY else jax.tree_util.tree_map(
      lambda m, x: x if m else x.astype(dtype), mask[k], v) for k, v in params.items()}


def trainable_mask(params, heads_trainable: bool = True):
  """True for the adapters' A and B (and, with `heads_trainable`, a score head's
  kernel and bias: a value model's new head); False elsewhere."""
  def one(path, _):
    keys = [getattr(k, "key", str(k)) for k in path]
    if keys[0] == KEY:
      return keys[-1] in ("a", "b")
    return heads_trainable and keys[0] in ("score_kernel", "score_bias")
  return jax.tree_util.tree_map_with_path(one, params)


def num_adapter_params(params) -> int:
  lora = params.get(KEY, {})
  return int(sum(x.size for k, x in jax.tree_util.tree_flatten_with_path(lora)[0]
                 if getattr(k[-1], "key", None) in ("a", "b")))

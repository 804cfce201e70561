"""Pure functions around the Transformer: init, forward, logits, scores, cache.

Parameters are a plain nested dict (unboxed). Which heads a params tree has is
read off its keys: "lm" when the embeddings are tied or `lm_head` exists,
"score" when `score_kernel` exists.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cai_jax.models import lora
from cai_jax.models.config import ModelConfig
from cai_jax.models.transformer import Transformer


def heads_of(cfg: ModelConfig, params) -> tuple:
  p = params.get("params", params)
  heads = []
  if cfg.tie_embeddings or "lm_head" in p:
    heads.append("lm")
  if "score_kernel" in p:
    heads.append("score")
  return tuple(heads)


def module(cfg: ModelConfig, heads: Sequence[str] = ("lm",)) -> Transformer:
  return Transformer(cfg, heads=tuple(heads))


def _init_boxed(cfg: ModelConfig, rng, heads):
  tokens = jnp.zeros((1, 4), jnp.int32)
  return module(cfg, heads).init(rng, tokens, jnp.zeros((1, 4), jnp.int32),
                                 jnp.ones((1, 4), bool))["params"]


def init_params(cfg: ModelConfig, rng, heads: Sequence[str] = ("lm",)):
  """Random parameters (unboxed) for the given heads."""
  return nn.meta.unbox(_init_boxed(cfg, rng, tuple(heads)))


def abstract_params(cfg: ModelConfig, heads: Sequence[str] = ("lm",)):
  """(ShapeDtypeStruct tree, logical PartitionSpec tree) without allocating."""
  boxed = jax.eval_shape(functools.partial(_init_boxed, cfg, heads=tuple(heads)),
                         jax.random.PRNGKey(0))
  specs = nn.get_partition_spec(boxed)
  return nn.meta.unbox(boxed), specs


def count_params(params) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


def add_score_head(cfg: ModelConfig, params, rng=None, init_std: float = 0.0):
  """Return params with a scalar head added (zero-initialised by default)."""
  rng = jax.random.PRNGKey(0) if rng is None else rng
  p = dict(params)
  dt = cfg.jnp_param_dtype
  A = (len(cfg.score_labels),) if cfg.score_labels else ()  # one score per label
  p["score_kernel"] = (init_std * jax.random.normal(rng, (cfg.hidden_size,) + A)).astype(dt)
  p["score_bias"] = jnp.zeros(A, dt)
  return p


def drop_heads(params, keep: Sequence[str]):
  p = dict(params)
  if "score" not in keep:
    p.pop("score_kernel", None)
    p.pop("score_bias", None)
  if "lm" not in keep:
    p.pop("lm_head", None)
  return p


def positions_from_mask(mask_BxL):
  """Positions for a left-padded batch: 0 at the first real token."""
  m = mask_BxL.astype(jnp.int32)
  return jnp.maximum(jnp.cumsum(m, axis=-1) - 1, 0)


def forward(cfg: ModelConfig, params, tokens_BxT, positions_BxT, mask, cache=None,
            cache_index=None, last_only: bool = False, heads: Optional[Sequence[str]] = None,
            pack=None):
  """One call of the model; returns a dict with logits/scores/hidden/cache
  (`pack`: a packed prefill, see `Transformer`)."""
  heads = heads_of(cfg, params) if heads is None else tuple(heads)
  return module(cfg, heads).apply(lora.variables(params), tokens_BxT, positions_BxT, mask,
                                  cache, cache_index, last_only, pack)


@functools.partial(jax.jit, static_argnums=0)
def logits(cfg: ModelConfig, params, tokens_BxL, mask_BxL=None):
  """float32 logits BxLxV for a (left-padded) batch."""
  if mask_BxL is None:
    mask_BxL = jnp.ones(tokens_BxL.shape, bool)
  out = forward(cfg, params, tokens_BxL, positions_from_mask(mask_BxL), mask_BxL,
                heads=("lm",))
  return out["logits"]


@functools.partial(jax.jit, static_argnums=0)
def scores(cfg: ModelConfig, params, tokens_BxL, mask_BxL=None):
  """Scalar head at every token, BxL float32 (value model); BxLxA for a head with
  cfg.score_labels."""
  if mask_BxL is None:
    mask_BxL = jnp.ones(tokens_BxL.shape, bool)
  out = forward(cfg, params, tokens_BxL, positions_from_mask(mask_BxL), mask_BxL,
                heads=("score",))
  return out["scores"]


def lm_head_weight(cfg: ModelConfig, params):
  """The LM head as a DxV matrix (the transposed embedding when tied)."""
  return params["embedding"].T if cfg.tie_embeddings else params["lm_head"]


def last_token_index(mask_BxL):
  """Index of the last real token in each row (works for left or right padding)."""
  L = mask_BxL.shape[1]
  idx = jnp.arange(L)[None, :]
  return jnp.max(jnp.where(mask_BxL.astype(bool), idx, -1), axis=1)


@functools.partial(jax.jit, static_argnums=0)
def reward(cfg: ModelConfig, params, tokens_BxL, mask_BxL):
  """Preference-model score: scalar head at the last non-pad token, B float32 (BxA
  for a head with cfg.score_labels)."""
  s = scores(cfg, params, tokens_BxL, mask_BxL)
  i = jnp.maximum(last_token_index(mask_BxL), 0)
  return s[jnp.arange(s.shape[0]), i]


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=None):
  """Preallocated per-layer KV cache: list of {"k": BxKxHxS, "v": BxKxSxH}
  (kv-head-major, keys slot-minor: see `transformer.cached_attention`)."""
  dtype = cfg.jnp_dtype if dtype is None else dtype
  K, H = cfg.num_kv_heads, cfg.head_dim
  return [{"k": jnp.zeros((batch, K, H, length), dtype),
           "v": jnp.zeros((batch, K, length, H), dtype)} for _ in range(cfg.num_layers)]


def cache_logical_axes(cfg: ModelConfig):
  return [{"k": ("batch", "kv_heads", "head_dim", "cache_length"),
           "v": ("batch", "kv_heads", "cache_length", "head_dim")}
          for _ in range(cfg.num_layers)]


def cast_params(params, dtype):
  return jax.tree_util.tree_map(lambda x: x.astype(dtype), params)


def frozen_copy(cfg: ModelConfig, params, dtype: str | None):
  """(cfg, params) of a model that is only read (reference, reward or feedback
  model) in `dtype`: params cast and computed in it. None or the model's own dtype:
  unchanged. Shardings are kept (the cast is elementwise)."""
  if not dtype or (jnp.dtype(dtype) == cfg.jnp_param_dtype and jnp.dtype(dtype) == cfg.jnp_dtype):
    return cfg, params
  cast = jax.jit(cast_params, static_argnums=1) if any(
      isinstance(x, jax.Array) for x in jax.tree_util.tree_leaves(params)) else cast_params
  return cfg.replace(dtype=str(dtype), param_dtype=str(dtype)), cast(params, str(dtype))


def stack_layers(cfg: ModelConfig, params):
  """Unrolled params (layers_0..) -> the `scan_layers` layout (layers_stack), LoRA
  adapters included; host arrays stay on the host (no device copy)."""
  host = all(isinstance(x, np.ndarray) for x in jax.tree_util.tree_leaves(params))
  stack = np.stack if host else jnp.stack
  p = dict(params)
  layers = [p.pop(f"layers_{i}") for i in range(cfg.num_layers)]
  p["layers_stack"] = jax.tree_util.tree_map(lambda *xs: stack(xs), *layers)
  if "lora" in p and "layers_0" in p["lora"]:
    p["lora"] = stack_layers(cfg, p["lora"])
  return p


def unstack_layers(cfg: ModelConfig, params):
  """The `scan_layers` layout -> unrolled params (layers_0..), e.g. for sampling."""
  p = dict(params)
  stacked = p.pop("layers_stack")
  for i in range(cfg.num_layers):
    p[f"layers_{i}"] = jax.tree_util.tree_map(lambda x, i=i: x[i], stacked)
  if "lora" in p and "layers_stack" in p["lora"]:
    p["lora"] = unstack_layers(cfg, p["lora"])
  return p

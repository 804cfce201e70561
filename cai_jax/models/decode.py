"""A one-token decode step computed feature-major, for the sampler on CPU.

`Transformer` keeps activations row-major (BxD) and multiplies them by the
stored KxN weights. For a decode step's skinny matmuls (one token per row)
XLA:CPU's dot library then repacks the KxN weight at every call: SmolLM2's
MLP at 64 rows ran at ~2.6 ms per layer, and at ~1.3 ms at 16 rows. With each
weight transposed once (NxK, row-major) and the activations feature-major
(DxB), the same product W^T x^T needs no repacking: ~2.2 and ~0.8 ms. XLA
folds a transpose next to a dot back into the slow form, so the residual
stream stays DxB through every layer and only attention, which is small,
works on the model's BxTxNxH layout (`transformer.cached_attention`, shared
with `Transformer`, so the two compute the same function).

`decode_weights` builds the transposed weights (a second copy of the trunk's
projection weights, in the compute dtype); the sampler builds them once per
params, outside its jitted call. `decode_step` is `Transformer` with a KV cache
at T = 1; the sampler's tests check it against full recompute.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from cai_jax.models.config import ModelConfig
from cai_jax.models.transformer import (apply_rope, cached_allowed, cached_attention, embed,
                                        glu, rms_norm, rope_sin_cos)


def decode_weights(cfg: ModelConfig, params) -> list:
  """Per layer {"qkv": (N+2K)H x D, "o": D x NH, "gate_up": 2F x D, "down": D x F}
  (plus "qkv_bias" when the model has one), transposed, in the compute dtype."""
  D, N, K, H = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  cd = cfg.jnp_dtype
  out = []
  for i in range(cfg.num_layers):
    a, m = params[f"layers_{i}"]["attn"], params[f"layers_{i}"]["mlp"]
    qkv = jnp.concatenate([a["q_kernel"].reshape(D, N * H), a["k_kernel"].reshape(D, K * H),
                           a["v_kernel"].reshape(D, K * H)], axis=1)
    w = {"qkv": qkv.T.astype(cd),
         "o": a["o_kernel"].reshape(N * H, D).T.astype(cd),
         "gate_up": jnp.concatenate([m["gate_kernel"], m["up_kernel"]], axis=1).T.astype(cd),
         "down": m["down_kernel"].T.astype(cd)}
    if cfg.qkv_bias:
      w["qkv_bias"] = jnp.concatenate([a["q_bias"].reshape(-1), a["k_bias"].reshape(-1),
                                       a["v_bias"].reshape(-1)]).astype(cd)
    out.append(w)
  return out


def decode_step(cfg: ModelConfig, weights, params, tok_B, pos_B, mask_BxS, cache, slot):
  """One new token per row: (final-norm hidden states DxB, the new cache).

  weights: `decode_weights(cfg, params)`; tok_B, pos_B: each row's token and
  its position; mask_BxS, cache, slot: as `Transformer` takes them with a
  cache (the valid slots after the write, the per-layer KV cache with an
  optional shared prefix, the write index); a row attends to the valid
  slots up to `slot`.
  """
  N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  F = cfg.intermediate_size
  B = tok_B.shape[0]
  x_DxB = embed(cfg, params["embedding"], tok_B).T
  sin, cos = rope_sin_cos(cfg, pos_B[:, None])
  allowed_Bx1xS = cached_allowed(mask_BxS.astype(bool), slot, 1)
  new_cache = []
  for i, w in enumerate(weights):
    p = params[f"layers_{i}"]
    h_DxB = rms_norm(cfg, x_DxB, p["attn_norm"]["scale"], axis=0)
    # The barriers keep each projection's output materialised feature-major:
    # a transpose left next to the dot is folded into it (the slow form).
    qkv = jax.lax.optimization_barrier(w["qkv"] @ h_DxB)
    if cfg.qkv_bias:
      qkv = qkv + w["qkv_bias"][:, None]
    qkv = qkv.T.reshape(B, 1, N + 2 * K, H)
    q = apply_rope(qkv[:, :, :N], sin, cos)
    k = apply_rope(qkv[:, :, N:N + K], sin, cos)
    o, c = cached_attention(cfg, q, k, qkv[:, :, N + K:], allowed_Bx1xS, cache[i], slot)
    new_cache.append(c)
    o_NHxB = jax.lax.optimization_barrier(o.reshape(B, N * H).T)
    x_DxB = x_DxB + w["o"] @ o_NHxB
    gu = w["gate_up"] @ rms_norm(cfg, x_DxB, p["mlp_norm"]["scale"], axis=0)
    x_DxB = x_DxB + w["down"] @ glu(cfg, gu[:F], gu[F:])
  return rms_norm(cfg, x_DxB, params["final_norm"]["scale"], axis=0), new_cache

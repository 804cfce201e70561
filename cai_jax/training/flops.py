"""Throughput accounting: model FLOPs per step and the device's peak rate.

MFU = achieved model FLOPs/s over peak FLOPs/s. On TPUs the peak is the
published bf16 rate per chip; on CPUs there is no published figure, so the
peak is the float32 matmul rate measured on this machine (the same yardstick
the benchmarks use).
"""
from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp

# Published dense bf16 peaks per chip.
_TPU_PEAK = {"v2": 45e12, "v3": 123e12, "v4": 275e12, "v5 lite": 197e12, "v5e": 197e12,
             "v5p": 459e12, "v5": 459e12, "v6 lite": 918e12, "v6e": 918e12}


def train_flops_per_token(cfg, seq_len: int, lm_head: bool = True,
                          trainable_layers: int = -1) -> float:
  """Forward + backward FLOPs per token (backward ≈ 2 × forward).

  lm_head=False drops the vocabulary projection (preference/value models).
  trainable_layers=k (>= 0): only the top k blocks are trained, so the
  backward pass covers just those (plus the head).
  """
  fwd = cfg.flops_per_token(seq_len)
  head = 2.0 * cfg.vocab_size * cfg.hidden_size
  if not lm_head:
    fwd -= head
  if trainable_layers is None or trainable_layers < 0:
    return 3.0 * fwd
  trunk = fwd - (head if lm_head else 0.0)
  bwd = 2.0 * trunk * min(trainable_layers, cfg.num_layers) / cfg.num_layers
  return fwd + bwd + (2.0 * head if lm_head else 0.0)


def matmul_flops_rate(n: int = 1024, reps: int = 5, dtype=jnp.float32) -> float:
  """Best-of-reps rate of an n×n×n matmul on the default device, FLOP/s."""
  a = jnp.ones((n, n), dtype)
  b = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x, y: x @ y)
  f(a, b).block_until_ready()
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2.0 * n ** 3 / best


@functools.lru_cache(maxsize=1)
def peak_flops() -> float:
  """Peak FLOP/s of all local devices (measured f32 matmul rate on CPU)."""
  dev = jax.devices()[0]
  if dev.platform == "tpu":
    kind = dev.device_kind.lower()
    for k, v in sorted(_TPU_PEAK.items(), key=lambda kv: -len(kv[0])):
      if k in kind:
        return v * jax.device_count()
    return 0.0
  if dev.platform == "cpu":
    return matmul_flops_rate(512, reps=3)
  return 0.0

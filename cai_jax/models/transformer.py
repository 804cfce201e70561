"""One decoder-only Transformer (flax.linen) for every role in the pipeline.

Policy, reference and feedback model read the LM head; the preference model
reads the scalar head at the last real token and the value model at every
token. Parameters carry logical axis names; the model never names mesh axes.

Layers are unrolled (not scanned) so that each layer's KV cache is its own
buffer: inside the sampler's while-loop XLA then updates it in place instead of
copying a stacked cache every step.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cai_jax import sharding as shd
from cai_jax.models.config import ModelConfig

Array = jax.Array
_NEG = -0.7 * float(np.finfo(np.float32).max)


def _param(mod: nn.Module, name: str, shape, axes, init, dtype):
  return mod.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def adapted(mod: nn.Module, name: str, x: Array, y: Array) -> Array:
  """y plus x A B when the variables carry a LoRA adapter of kernel `name`
  (collection "lora", B already scaled): the low-rank update runs beside the
  frozen projection, so no adapted copy of the kernel is ever materialised."""
  if not mod.has_variable("lora", name):
    return y
  ab = mod.get_variable("lora", name)
  r = ab["a"].shape[-1]
  a = ab["a"].reshape(-1, r).astype(x.dtype)
  b = ab["b"].reshape(r, -1).astype(x.dtype)
  return y + dense(dense(x, a), b).astype(y.dtype)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
  half = cfg.head_dim // 2
  inv = 1.0 / (cfg.rope_theta ** (np.arange(0, half, dtype=np.float64) * 2 / cfg.head_dim))
  if cfg.rope_scaling:
    s = dict(cfg.rope_scaling)
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old = s["original_max_position_embeddings"]
    wavelen = 2 * np.pi / inv
    lo_wl, hi_wl = old / lo, old / hi
    scaled = np.where(wavelen > lo_wl, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    mid = (1 - smooth) * scaled / factor + smooth * scaled
    is_mid = (wavelen >= hi_wl) & (wavelen <= lo_wl)
    inv = np.where(is_mid, mid, scaled)
  return inv.astype(np.float32)


def dense(x: Array, w: Array, preferred_element_type=None) -> Array:
  """x[..., K] @ w[K, M] as one 2-D matmul over the flattened leading dims.

  A 3-D [B, T, K] dot_general makes autodiff contract the weight gradient over
  two dims (b, t); XLA:CPU then wrote the (recomputed) activation gradient
  transposed before the matmul, which cost ~20% of a SmolLM2 train step.
  """
  lead = x.shape[:-1]
  y = jax.lax.dot(x.reshape(-1, x.shape[-1]), w, preferred_element_type=preferred_element_type)
  return y.reshape(*lead, w.shape[-1])


# Query block length of uncached (causal) attention: each block attends to the
# keys up to its own end, skipping the masked upper triangle.
ATTN_QUERY_BLOCK = 128
ATTN_MAX_QUERY_BLOCKS = 8
_ROPE_TABLE_MAX = 1 << 21  # elements per table; longer contexts compute sin/cos in-graph


def _query_blocks(T: int) -> int:
  """Most blocks (at most ATTN_MAX_QUERY_BLOCKS) of >= ATTN_QUERY_BLOCK queries dividing T."""
  for n in range(min(ATTN_MAX_QUERY_BLOCKS, T // ATTN_QUERY_BLOCK), 1, -1):
    if T % n == 0:
      return n
  return 1


@functools.lru_cache(maxsize=8)
def _rope_tables(cfg: ModelConfig):
  # The angle is rounded to float32 first, as a float32 in-graph computation
  # (and the reference implementation) does; sin/cos of it are then exact.
  pos = np.arange(cfg.max_position_embeddings, dtype=np.float32)[:, None]
  ang = (pos * rope_inv_freq(cfg)[None, :]).astype(np.float64)
  return np.sin(ang).astype(np.float32), np.cos(ang).astype(np.float32)


def rope_sin_cos(cfg: ModelConfig, positions_BxT: Array):
  """(sin, cos), each BxTx(head_dim/2), for integer positions.

  Read from a per-position table when it is small: computed in-graph, XLA:CPU
  fuses sin/cos into every layer's RoPE fusion and recomputes them per head,
  per layer, forward and backward (~5% of a SmolLM2 train step).
  """
  half = cfg.head_dim // 2
  if cfg.max_position_embeddings * half <= _ROPE_TABLE_MAX:
    sin_t, cos_t = _rope_tables(cfg)
    idx = jnp.clip(positions_BxT, 0, cfg.max_position_embeddings - 1)
    return jnp.take(jnp.asarray(sin_t), idx, axis=0), jnp.take(jnp.asarray(cos_t), idx, axis=0)
  ang = positions_BxT.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(cfg))
  return jnp.sin(ang), jnp.cos(ang)


def apply_rope(x_BxTxNxH: Array, sin_BxTxH: Array, cos_BxTxH: Array) -> Array:
  """Half-rotation RoPE (the Hugging Face layout)."""
  dtype = x_BxTxNxH.dtype
  x = x_BxTxNxH.astype(jnp.float32)
  half = x.shape[-1] // 2
  x1, x2 = x[..., :half], x[..., half:]
  sin = sin_BxTxH[:, :, None, :]
  cos = cos_BxTxH[:, :, None, :]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(dtype)


def rms_norm(cfg: ModelConfig, x: Array, scale: Array, axis: int = -1) -> Array:
  """RMSNorm of x over `axis` (features), scaled per feature by `scale`."""
  shape = [1] * x.ndim
  shape[axis] = -1
  scale = scale.reshape(shape)
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=axis, keepdims=True) + cfg.rms_norm_eps)
  if cfg.norm_plus_one:
    return (y * (1.0 + scale.astype(jnp.float32))).astype(cfg.jnp_dtype)
  return scale.astype(cfg.jnp_dtype) * y.astype(cfg.jnp_dtype)


def glu(cfg: ModelConfig, gate: Array, up: Array) -> Array:
  """The MLP's gated activation: act(gate) * up."""
  if cfg.activation == "silu":
    return jax.nn.silu(gate) * up
  return jax.nn.gelu(gate, approximate=True) * up


def embed(cfg: ModelConfig, embedding: Array, tokens: Array) -> Array:
  """Token embeddings in the compute dtype (times sqrt(hidden_size) for Gemma)."""
  x = jnp.take(embedding, tokens, axis=0).astype(cfg.jnp_dtype)
  if cfg.scale_embeddings:
    x = x * jnp.asarray(np.sqrt(cfg.hidden_size), dtype=cfg.jnp_dtype)
  return x


def cached_allowed(mask_BxS: Array, cache_index, T: int) -> Array:
  """BxTxS: new token t, written at slot cache_index + t, sees the valid
  slots (mask_BxS) up to its own. cache_index may be a scalar or one write
  index per row (a B vector, T = 1: rows of a continuous batch, each at its
  own length)."""
  slot = jnp.arange(mask_BxS.shape[1])[None, :]
  if jnp.ndim(cache_index) == 1:
    qpos = cache_index[:, None, None] + jnp.arange(T)[None, :, None]
    return (slot[None] <= qpos) & mask_BxS[:, None, :]
  qpos = cache_index + jnp.arange(T)[:, None]
  return (slot <= qpos)[None] & mask_BxS[:, None, :]


class RMSNorm(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    init = nn.initializers.zeros if cfg.norm_plus_one else nn.initializers.ones
    scale = _param(self, "scale", (x.shape[-1],), ("norm",), init, cfg.jnp_param_dtype)
    return rms_norm(cfg, x, scale)


def cached_attention(cfg: ModelConfig, q, k, v, allowed_BxTxS, cache, cache_index,
                     packed_q=None):
  """Attention of T new queries per row (q BxTxNxH, k and v BxTxKxH, after
  RoPE) over the cache (keys BxKxHxS, values BxKxSxH) after writing the T new
  keys/values at `cache_index`; returns (the heads' outputs BxTx(N*H) before
  the o-projection, the new cache).

  packed_q (a packed prefill, or None): (the real queries QxNxH, pack_index
  BxT, each row slot's index among them); a shared prefix is then attended
  by the real queries only, not by every padded row slot.

  The cache is kv-head-major, so no step transposes it (with a BxSxKxH cache
  XLA transposed the whole cache, and o_kernel, at every decode step). Keys
  are stored slot-minor: a decode step (T = 1) computes its scores as a
  multiply and a sum over head_dim, and its output as a multiply and a sum
  over slots, both vectorised along the minor dimension. As batched dots with
  3 query rows per KV head those two took ~2.7 ms per SmolLM2 layer at batch
  64; as reductions ~1.2 ms (the whole sampler: ~240 vs ~200 tokens/s).
  """
  N, K, H = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  G = N // K
  cd = cfg.jnp_dtype
  B, T = q.shape[:2]
  if jnp.ndim(cache_index) == 1:
    # One write index per row (T = 1): each row writes its slot of its own line.
    if T != 1:
      raise ValueError("per-row cache indices take one new token per row")
    rows = jnp.arange(B)
    k_all = cache["k"].at[rows, :, :, cache_index].set(k[:, 0].astype(cache["k"].dtype))
    v_all = cache["v"].at[rows, :, cache_index, :].set(v[:, 0].astype(cache["v"].dtype))
  else:
    k_all = jax.lax.dynamic_update_slice_in_dim(
        cache["k"], k.transpose(0, 2, 3, 1).astype(cache["k"].dtype), cache_index, axis=3)
    v_all = jax.lax.dynamic_update_slice_in_dim(
        cache["v"], v.transpose(0, 2, 1, 3).astype(cache["v"].dtype), cache_index, axis=2)
  q = q.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4)
  # With a static write index (a prefill), slots after the new tokens are
  # never visible to them: attend over the slots up to the last one only.
  keys, values = k_all, v_all
  if isinstance(cache_index, int) and cache_index + T < allowed_BxTxS.shape[-1]:
    allowed_BxTxS = allowed_BxTxS[..., :cache_index + T]
  # A mask shorter than the lines (a decode block's attention window) reads
  # their first slots only. The slice is fused into the score and output
  # reductions, so no step copies the window out of the cache.
  S_att = allowed_BxTxS.shape[-1]
  if S_att < k_all.shape[3]:
    keys, values = k_all[..., :S_att], v_all[:, :, :S_att]
  one_query = T == 1
  if one_query:
    s = (q[:, :, :, :, :, None].astype(jnp.float32)
         * keys[:, :, None, None, :, :].astype(jnp.float32)).sum(-2)
  else:
    s = jnp.einsum("bkgth,bkhs->bkgts", q, keys.astype(cd), preferred_element_type=jnp.float32)
  s = s * (1.0 / np.sqrt(H))
  s = jnp.where(allowed_BxTxS[:, None, None, :, :], s, _NEG)
  pk, pv = cache.get("prefix_k"), cache.get("prefix_v")
  if pk is None:
    p = jax.nn.softmax(s, axis=-1).astype(cd)
    o = _attend_values(p, values, one_query, cd)
  elif packed_q is None:
    o = _with_shared_prefix(q, s, values, pk, pv, one_query, cd)
  else:
    o = _with_packed_prefix(s, values, pk, pv, cd, *packed_q)
  # One merged (n, h) contraction: einsum orders the two contracting dims
  # (h, n), which made XLA transpose o_kernel at every decode step.
  return o.transpose(0, 3, 1, 2, 4).reshape(B, T, N * H), dict(cache, k=k_all, v=v_all)



def _attend_values(p, values, one_query, cd):
  """Weights p (BxKxGxTxS) applied to values (BxKxSxH), in cd."""
  if one_query:
    return (p[..., None].astype(jnp.float32)
            * values[:, :, None, None, :, :].astype(jnp.float32)).sum(-2).astype(cd)
  return jnp.einsum("bkgts,bksh->bkgth", p, values.astype(cd))


def _prefix_part(q_KxMxH, pk, pv, cd):
  """Attention of M stacked queries per KV head over a prefix shared by every
  row (keys KxHxL, values KxLxH): the per-query score max, the sum of the
  exponentials below it and their (unnormalised) value product, KxMx1,
  KxMx1, KxMxH. One matmul per KV head with every query stacked, not a
  batched dot over rows against an unbatched operand; the probabilities are
  never materialised (on CPU this attention is bound by its passes over the
  score tensors, benchmarks/README.md)."""
  f32 = jnp.float32
  sp = jnp.einsum("kmh,khl->kml", q_KxMxH, pk.astype(cd), preferred_element_type=f32)
  sp = sp * (1.0 / np.sqrt(q_KxMxH.shape[-1]))
  m_pre = sp.max(-1, keepdims=True)
  e_pre = jnp.exp(sp - m_pre)
  o_pre = jnp.einsum("kml,klh->kmh", e_pre.astype(cd), pv.astype(cd), preferred_element_type=f32)
  return m_pre, e_pre.sum(-1, keepdims=True), o_pre


def _merge_prefix(s, values, m_pre, sum_pre, o_pre, one_query, cd):
  """Softmax attention over the rows' own slots (scores s, BxKxGxTxS) and a
  shared prefix (`_prefix_part`'s results in row layout, BxKxGxTx1/H), without
  concatenating the two: both are rescaled to the common max and normalised
  after the value products."""
  f32 = jnp.float32
  top = jnp.maximum(s.max(-1, keepdims=True), m_pre)
  e_rows = jnp.exp(s - top)
  scale = jnp.exp(m_pre - top)
  total = e_rows.sum(-1, keepdims=True) + sum_pre * scale
  if one_query:
    o_rows = (e_rows[..., None] * values[:, :, None, None, :, :].astype(f32)).sum(-2)
  else:
    o_rows = jnp.einsum("bkgts,bksh->bkgth", e_rows.astype(cd), values.astype(cd),
                        preferred_element_type=f32)
  return ((o_rows + o_pre * scale) / total).astype(cd)


def _with_shared_prefix(q, s, values, pk, pv, one_query, cd):
  """Attention over a shared prefix (keys KxHxL, values KxLxH; before all row
  slots, always visible) and the rows' own slots, every row slot's queries
  (q BxKxGxTxH) attending the prefix. Only the prefix part's per-query
  results (trailing dims 1 and H) change layout, never its scores."""
  B, K, G, T, H = q.shape

  def to_rows(x):  # KxMxC -> BxKxGxTxC
    return x.reshape(K, B, G, T, x.shape[-1]).transpose(1, 0, 2, 3, 4)

  parts = _prefix_part(q.transpose(1, 0, 2, 3, 4).reshape(K, B * G * T, H), pk, pv, cd)
  return _merge_prefix(s, values, *map(to_rows, parts), one_query, cd)


def _with_packed_prefix(s, values, pk, pv, cd, q_QxNxH, pack_index_BxT):
  """`_with_shared_prefix` for a packed prefill: the prefix part runs on the Q
  real queries, and only its small per-query results are gathered into the
  BxT row slots."""
  B, K, G, T, _ = s.shape
  Q, H = q_QxNxH.shape[0], q_QxNxH.shape[-1]

  def to_rows(x):  # KxQGxC -> BxKxGxTxC
    x = x.reshape(K, Q, G, x.shape[-1])[:, pack_index_BxT]
    return x.transpose(1, 0, 3, 2, 4)

  parts = _prefix_part(q_QxNxH.reshape(Q, K, G, H).transpose(1, 0, 2, 3).reshape(K, Q * G, H),
                       pk, pv, cd)
  return _merge_prefix(s, values, *map(to_rows, parts), False, cd)


class Attention(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxTxD, sin, cos, allowed_BxTxS, cache=None, cache_index=None,
               pack=None):
    cfg = self.cfg
    D, N, K, H = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    G = N // K
    pd, cd = cfg.jnp_param_dtype, cfg.jnp_dtype
    kinit = nn.initializers.normal(0.02)
    wq = _param(self, "q_kernel", (D, N, H), ("embed", "heads", "head_dim"), kinit, pd)
    wk = _param(self, "k_kernel", (D, K, H), ("embed", "kv_heads", "head_dim"), kinit, pd)
    wv = _param(self, "v_kernel", (D, K, H), ("embed", "kv_heads", "head_dim"), kinit, pd)
    wo = _param(self, "o_kernel", (N, H, D), ("heads", "head_dim", "embed"), kinit, pd)
    x = x_BxTxD.astype(cd)
    B, T = x.shape[:2]
    def project(name, w):
      return adapted(self, name, x, dense(x, w.reshape(D, -1).astype(cd)))

    q = shd.constrain(project("q_kernel", wq).reshape(B, T, N, H),
                      ("batch", "length", "heads"))
    k = shd.constrain(project("k_kernel", wk).reshape(B, T, K, H),
                      ("batch", "length", "kv_heads"))
    v = shd.constrain(project("v_kernel", wv).reshape(B, T, K, H),
                      ("batch", "length", "kv_heads"))
    if cfg.qkv_bias:
      zinit = nn.initializers.zeros
      q = q + _param(self, "q_bias", (N, H), ("heads", "head_dim"), zinit, pd).astype(cd)
      k = k + _param(self, "k_bias", (K, H), ("kv_heads", "head_dim"), zinit, pd).astype(cd)
      v = v + _param(self, "v_bias", (K, H), ("kv_heads", "head_dim"), zinit, pd).astype(cd)
    q = apply_rope(q, sin, cos)
    k = apply_rope(k, sin, cos)
    wo_2d = wo.reshape(N * H, -1).astype(cd)

    def out_proj(o):
      return adapted(self, "o_kernel", o, dense(o, wo_2d))

    if pack is not None:
      # Packed prefill: x holds the real prompt tokens of all rows as one row
      # (1 x T). The projections above and the o-projection and MLP after run
      # on those T tokens only; attention gathers them into their BxP row
      # slots and the result is gathered back.
      pack_index_BxP, slot_index_T = pack
      q_packed = (q[0], pack_index_BxP)
      q, k, v = (a[0][pack_index_BxP] for a in (q, k, v))
      o, new_cache = cached_attention(cfg, q, k, v, allowed_BxTxS, cache, cache_index,
                                      q_packed)
      o = o.reshape(-1, N * H)[slot_index_T][None]
      return out_proj(o), new_cache
    if cache is not None:
      o, new_cache = cached_attention(cfg, q, k, v, allowed_BxTxS, cache, cache_index)
      return out_proj(o), new_cache
    # Head-major layouts, with a KV head's G query heads stacked along the
    # query axis, so both attention dots are plain batched [G*Tq, H] matmuls.
    q = q.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4)
    k = k.transpose(0, 2, 1, 3)
    v = v.transpose(0, 2, 1, 3)
    # Without a cache attention is causal, so query block i needs keys up to
    # the end of block i only: blocks skip the masked upper triangle.
    n_blk = _query_blocks(T)
    tq = T // n_blk
    outs = []
    for i in range(n_blk):
      ts = (i + 1) * tq
      qi = q[:, :, :, i * tq:ts].reshape(B, K, G * tq, H)
      s = jnp.einsum("bkmh,bksh->bkms", qi, k[:, :, :ts], preferred_element_type=jnp.float32)
      s = s.reshape(B, K, G, tq, ts) * (1.0 / np.sqrt(H))
      s = jnp.where(allowed_BxTxS[:, None, None, i * tq:ts, :ts], s, _NEG)
      p = jax.nn.softmax(s, axis=-1).astype(cd).reshape(B, K, G * tq, ts)
      o = jnp.einsum("bkms,bksh->bkmh", p, v[:, :, :ts]).reshape(B, K, G, tq, H)
      outs.append(o.transpose(0, 3, 1, 2, 4))
    o = outs[0] if n_blk == 1 else jnp.concatenate(outs, axis=1)
    return out_proj(o.reshape(B, T, N * H)), None


class MLP(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    D, F = cfg.hidden_size, cfg.intermediate_size
    pd, cd = cfg.jnp_param_dtype, cfg.jnp_dtype
    kinit = nn.initializers.normal(0.02)
    wg = _param(self, "gate_kernel", (D, F), ("embed", "mlp"), kinit, pd)
    wu = _param(self, "up_kernel", (D, F), ("embed", "mlp"), kinit, pd)
    wd = _param(self, "down_kernel", (F, D), ("mlp", "embed"), kinit, pd)
    x = x.astype(cd)
    g = shd.constrain(adapted(self, "gate_kernel", x, dense(x, wg.astype(cd))),
                      ("batch", "length", "mlp"))
    u = shd.constrain(adapted(self, "up_kernel", x, dense(x, wu.astype(cd))),
                      ("batch", "length", "mlp"))
    h = glu(cfg, g, u)
    return adapted(self, "down_kernel", h, dense(h, wd.astype(cd)))


class Block(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, sin, cos, allowed, cache=None, cache_index=None, pack=None):
    x = shd.constrain(x, ("batch",))
    h, new_cache = Attention(self.cfg, name="attn")(
        RMSNorm(self.cfg, name="attn_norm")(x), sin, cos, allowed, cache, cache_index, pack)
    x = shd.constrain(x + h, ("batch",))
    x = x + MLP(self.cfg, name="mlp")(RMSNorm(self.cfg, name="mlp_norm")(x))
    return shd.constrain(x, ("batch",)), new_cache


class Transformer(nn.Module):
  """Decoder trunk plus the heads named in `heads` ("lm", "score").

  Call with tokens_BxT and positions_BxT. Without a cache, `mask_BxT` marks real
  tokens (left padding allowed) and attention is causal over the T tokens;
  a BxTxT `mask` gives the allowed query/key pairs directly (packed rows).
  With a cache (a list of per-layer {"k": BxKxHxS, "v": BxKxSxH}), the T new
  tokens are written at slot `cache_index` and `mask_BxT` must be the BxS mask
  of valid slots after the write. A layer's cache may also hold "prefix_k" and
  "prefix_v" (KxHxL and KxLxH): the keys/values of a prefix shared by every row, which
  comes before all row slots (positions must count it).

  `pack` = (pack_index_BxP, slot_index_T) runs a cached prefill of a BxP
  batch on its real tokens only: tokens and positions are then 1xT (every
  row's real tokens, row after row, then filler), pack_index_BxP is each row
  slot's index among the T (any index for padding slots) and slot_index_T
  each packed token's flat row slot b*P+p (any slot for filler). `last_only`
  returns each row's last slot, as without packing; `mask_BxT` is the BxS slot
  mask as without packing; the write index must be a Python int.
  """
  cfg: ModelConfig
  heads: tuple = ("lm",)

  @nn.compact
  def __call__(self, tokens_BxT, positions_BxT, mask, cache=None, cache_index=None,
               last_only: bool = False, pack=None) -> dict[str, Any]:
    cfg = self.cfg
    if pack is not None and (cache is None or not isinstance(cache_index, int)
                             or cfg.scan_layers):
      raise ValueError("a packed prefill needs a KV cache, an int cache_index and "
                       "unrolled layers")
    pd, cd = cfg.jnp_param_dtype, cfg.jnp_dtype
    V, D = cfg.vocab_size, cfg.hidden_size
    emb = _param(self, "embedding", (V, D), ("vocab", "embed"),
                 nn.initializers.normal(0.02), pd)
    x = embed(cfg, emb, tokens_BxT)

    sin, cos = rope_sin_cos(cfg, positions_BxT)

    # Queries per row: the row width of a packed prefill, else the tokens given.
    T = tokens_BxT.shape[1] if pack is None else pack[0].shape[1]
    mask = mask.astype(bool)
    if cache is None:
      causal = jnp.tril(jnp.ones((T, T), bool))
      # A BxTxT mask (packed training rows: same-document pairs) is used as is.
      allowed = causal[None] & (mask if mask.ndim == 3 else mask[:, None, :])
    else:
      allowed = cached_allowed(mask, cache_index, T)

    new_cache = []
    if cfg.scan_layers:
      if cache is not None:
        raise ValueError("a scan_layers model runs without a KV cache; convert its params "
                         "with models.unstack_layers and sample with scan_layers=False")
      block_cls = nn.remat(Block, prevent_cse=False) if cfg.remat else Block
      stack = nn.scan(block_cls, variable_axes={"params": 0, "lora": 0}, split_rngs={"params": True},
                      in_axes=(nn.broadcast,) * 5, length=cfg.num_layers,
                      metadata_params={nn.PARTITION_NAME: "layers"})
      x, _ = stack(cfg, name="layers_stack")(x, sin, cos, allowed, None, None)
    else:
      block_cls = nn.remat(Block) if cfg.remat else Block
      for i in range(cfg.num_layers):
        layer_cache = None if cache is None else cache[i]
        x, c = block_cls(cfg, name=f"layers_{i}")(x, sin, cos, allowed, layer_cache,
                                                  cache_index, pack)
        new_cache.append(c)
    x = RMSNorm(cfg, name="final_norm")(x)
    out: dict[str, Any] = {"cache": None if cache is None else new_cache}
    if pack is not None:
      h = x[0][pack[0][:, -1]][:, None] if last_only else x
    else:
      h = x[:, -1:] if last_only else x
    if "lm" in self.heads:
      if cfg.tie_embeddings:
        w = emb.T
      else:
        w = _param(self, "lm_head", (D, V), ("embed", "vocab"),
                   nn.initializers.normal(0.02), pd)
      out["logits"] = dense(h, w.astype(cd), preferred_element_type=jnp.float32)
    if "score" in self.heads:
      # One scalar (BxL), or one per label of cfg.score_labels (BxLxA).
      A = (len(cfg.score_labels),) if cfg.score_labels else ()
      ws = _param(self, "score_kernel", (D,) + A, ("embed",) + (None,) * len(A),
                  nn.initializers.normal(0.02), pd)
      bs = _param(self, "score_bias", A, (None,) * len(A), nn.initializers.zeros, pd)
      out["scores"] = (jnp.einsum("btd,d...->bt...", h.astype(jnp.float32),
                                  ws.astype(jnp.float32)) + bs.astype(jnp.float32))
    out["hidden"] = h
    return out

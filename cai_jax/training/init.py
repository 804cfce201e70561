"""`init_from`: the weights a fresh run starts from.

Accepts "tiny", "smollm2", an HF checkpoint directory, a .gguf file, an
earlier stage's directory (its `final/` export, or its Orbax checkpoints when
it has no export yet) or that stage's `checkpoints/` directory.
"""
from __future__ import annotations

import os

from cai_jax.stages import common
from cai_jax.training import checkpoint
from cai_jax.utils import InputError

TOKENIZER_DIR = "tokenizer"


def load_init(path: str, seed: int = 0, dtype=None, heads=("lm",)):
  """(cfg, params, tokenizer) from any `init_from` form (see module docstring)."""
  if not path:
    raise InputError("init_from is empty; set it to 'smollm2', an HF dir, a .gguf file or a "
                     "stage directory")
  p = os.path.expanduser(path)
  if os.path.isdir(p) and not os.path.isfile(os.path.join(p, "config.json")):
    final = os.path.join(p, "final")
    if os.path.isfile(os.path.join(final, "config.json")):
      return common.load_model(final, seed=seed, dtype=dtype, heads=heads)
    d = checkpoint.find_checkpoint_dir(p)
    if d is None:
      raise InputError(f"{path}: neither an HF checkpoint (config.json), a stage directory with "
                       "final/ nor a checkpoint directory; point init_from at one of those")
    overrides = {} if dtype is None else {"dtype": dtype}
    cfg, params = checkpoint.load_params_from_stage(d, **overrides)
    tok_dir = os.path.join(d, TOKENIZER_DIR)
    if not os.path.isdir(tok_dir):
      raise InputError(f"{d}: no {TOKENIZER_DIR}/ saved beside the checkpoints")
    return cfg, params, common.load_tokenizer(tok_dir)
  if p not in ("tiny",) and not os.path.exists(p) and not p.startswith("smollm2"):
    raise InputError(f"init_from {path}: not found; point it at an HF dir, a .gguf file, a stage "
                     "directory, 'smollm2' or 'tiny'")
  return common.load_model(path, seed=seed, dtype=dtype, heads=heads)


def prepare_checkpoint_dir(directory: str, cfg, tokenizer) -> None:
  """Writes the model config and tokenizer beside a stage's checkpoints (once)."""
  os.makedirs(directory, exist_ok=True)
  if not os.path.isfile(os.path.join(directory, checkpoint.MODEL_CONFIG_FILE)):
    checkpoint.write_model_config(directory, cfg)
  tok_dir = os.path.join(directory, TOKENIZER_DIR)
  if tokenizer is not None and not os.path.isdir(tok_dir):
    tmp = tok_dir + ".tmp"
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, tok_dir)

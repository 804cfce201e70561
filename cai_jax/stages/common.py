"""Shared by the stages: model loading (presets, pretrained paths, tokenizers),
config sections, run signatures and the generation stages' sampler mesh."""
from __future__ import annotations

import functools
import json
import logging
import os

import jax

from cai_jax import models
from cai_jax.utils import InputError, atomic_write_text

# The tokenizer every "tiny" random model uses: SmolLM2's (a real BPE vocabulary
# with a chat template), so tiny runs exercise the same text paths as real ones.
TINY_TOKENIZER = "smollm2"


def tiny_config(**overrides) -> models.ModelConfig:
  kw = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_layers=2,
            num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=2048,
            tie_embeddings=True, rope_theta=100000.0, bos_token_id=1, eos_token_id=2,
            pad_token_id=2)
  kw.update(overrides)
  return models.tiny(**kw)


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str):
  return models.load_tokenizer(TINY_TOKENIZER if path == "tiny" else path)


def load_model(path: str, seed: int = 0, dtype: str | None = None, heads=("lm",)):
  """(cfg, params, tokenizer) for "tiny", "smollm2", an HF dir or a .gguf file."""
  overrides = {} if dtype is None else {"dtype": dtype}
  if path == "tiny":
    cfg = tiny_config(**overrides)
    params = models.init_params(cfg, jax.random.PRNGKey(seed), heads)
  else:
    try:
      cfg, params = models.load_pretrained(path, **overrides)
    except models.CheckpointError as e:
      raise InputError(str(e)) from None
  return cfg, params, load_tokenizer(path)


def stage_section(config, stage: str, defaults):
  """The stage's config section over its defaults; an unknown field is an InputError."""
  base = defaults
  sec = config.get(stage, None) if hasattr(config, "get") else None
  if sec is not None:
    for k in sec.keys():
      if k not in base:
        raise InputError(f"config.{stage}.{k}: unknown field; known: {sorted(base.keys())}")
      base[k] = sec[k]
  return base


def check_run_signature(stage_dir: str, sig: dict, stage: str, volatile=()) -> None:
  """Records what a run's chunks depend on in STAGE_DIR/run.json; a resumed run
  whose signature differs (ignoring the stage section's `volatile` fields, which
  do not change what a chunk holds) is refused with an InputError."""
  path = os.path.join(stage_dir, "run.json")
  if not os.path.exists(path):
    atomic_write_text(path, json.dumps(sig, indent=2, ensure_ascii=False) + "\n")
    return
  with open(path, encoding="utf-8") as f:
    old = json.load(f)

  def strip(d):
    return {k: v for k, v in (d or {}).items() if k not in volatile}

  for k in sorted(set(old) | set(sig)):
    a, b = old.get(k), sig.get(k)
    if k == stage:
      a, b = strip(a), strip(b)
    if a != b:
      raise InputError(f"{path}: this workdir was started with a different {k!r}; "
                       "resume with the same config or use a fresh --workdir")


def generation_mesh(config, batch_size: int):
  """(mesh, sampler batch size) for a generation stage (revise, label).

  One process: the config's mesh and `batch_size` as given (unchanged
  behaviour). Several processes: the stages deal whole chunks to hosts, so each
  host samples on a mesh of its own devices (`sharding.local_mesh_from_config`),
  with the batch size rounded up to the global mesh's batch divisor exactly as
  the single-process sampler rounds it. Same batches, same per-batch random
  streams: a chunk's records do not depend on the host that made it, and equal
  a single-process run's wherever the float numerics agree. Each device holds
  more rows than on the global mesh; XLA may round a one-row matmul differently
  from a several-row one, so a near-tie in sampling can then pick another token,
  as a different config.mesh on one host can.

  Small calls: `sampling.generate` shrinks a call of n < batch_size prompts to
  the next power of two rounded up to the *passed* mesh's batch divisor, so a
  host may pad fewer rows than a single process would. Every row samples from
  its own key (fold_in of its row index), so that padding does not change the
  real rows' random streams; only the float-rounding caveat above applies.
  """
  from cai_jax import sharding
  mesh = sharding.mesh_from_config(config)
  if jax.process_count() == 1:
    return mesh, int(batch_size)
  d = sharding.batch_divisor(mesh)
  rounded = -(-int(batch_size) // d) * d
  local = sharding.local_mesh_from_config(config)
  if rounded % sharding.batch_divisor(local):
    logging.warning("generation: sampler batch %d does not divide over the local mesh %s; "
                    "records may differ from a single-process run", rounded,
                    dict(local.shape))
  return local, rounded

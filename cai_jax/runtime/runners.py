"""The two runners the stages plug their method into.

`run_chunks` (revise, label, generate_prompts): inputs cut into fixed-size
chunks, each turned into records by the stage's function and written once to
WORKDIR/<stage>/chunks/ under a temporary name, then renamed. A chunk draws
all its randomness from its own index, so a killed run resumes at the first
missing chunk and ends with exactly an uninterrupted run's records; after
SIGTERM/SIGINT it stops before the next chunk (finished chunks are on disk). With
several processes the chunks are dealt round robin (chunk j to host
j % process_count), each host samples its own on its own devices and the
records are gathered over the collectives (no shared disk needed).

`train` (sft, pm): a supervised phase on the one generic train loop, with
the stage's checkpoint manager (train state, data-iterator position, RNG),
per-step metrics and automatic resume.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import tqdm

from cai_jax import interrupts, multihost, utils
from cai_jax.utils import InputError


@dataclasses.dataclass
class Chunk:
  kind: str                     # file name prefix: chunks/<kind>-<index>.jsonl
  index: int                    # the chunk's number within its kind (its random stream)
  items: list                   # the inputs
  ids: Optional[list] = None    # the ids its records must carry (checked on resume)

  @property
  def size(self) -> int:
    return len(self.items)


@dataclasses.dataclass
class ChunkResult:
  records: list
  resumed: bool
  extra: Any = None             # what the stage's function returned beside the records


def chunk_list(kind: str, items: Sequence[dict], size: int, with_ids: bool = True) -> list:
  size = int(size)
  return [Chunk(kind, i, list(items[i * size:(i + 1) * size]),
                [it["id"] for it in items[i * size:(i + 1) * size]] if with_ids else None)
          for i in range(-(-len(items) // size))]


def _read_chunk(path: str, chunk: Chunk) -> Optional[list]:
  if not utils.exists(path):
    return None
  recs = list(utils.read_jsonl(path))
  if chunk.ids is not None and [r.get("id") for r in recs] != chunk.ids:
    raise InputError(f"{path}: finished chunk holds other prompts than this run would put "
                     "there (prompt set or chunk_size changed); use a fresh --workdir")
  return recs


def prepare_chunks(ctx) -> None:
  """The chunk directory, with a killed run's temporary files removed. Call
  before the stage's first collective (then this host is its only writer)."""
  utils.make_chunk_dir(ctx.path("chunks"))


def run_chunks(ctx, chunks: Sequence[Chunk], make: Callable[[Chunk], Any], *,
               desc: str, unit: str = "prompt", progress: bool = True) -> list[ChunkResult]:
  """Every chunk once, in order, on every host; `make(chunk)` returns the records
  (or (records, extra)); finished chunks are read back instead."""
  mine = multihost.host_jobs(len(chunks))
  bar = tqdm.tqdm(total=sum(chunks[j].size for j in mine), unit=unit, desc=desc,
                  disable=not progress, dynamic_ncols=True)

  def one(j: int) -> dict:
    chunk = chunks[j]
    path = ctx.path("chunks", f"{chunk.kind}-{chunk.index:05d}.jsonl")
    recs = _read_chunk(path, chunk)
    extra, resumed = None, recs is not None
    if recs is None:
      interrupts.check(f"{desc}, before chunk {chunk.kind}-{chunk.index:05d}")
      out = make(chunk)
      recs, extra = out if isinstance(out, tuple) else (out, None)
      utils.write_once(path, utils.jsonl_text(recs))
    bar.update(chunk.size)
    return {"records": recs, "resumed": resumed, "extra": extra}

  try:
    results = multihost.run_dealt(len(chunks), one)
  finally:
    bar.close()
  return [ChunkResult(r["records"], r["resumed"], r["extra"]) for r in results]


# ---------------------------------------------------------------- supervised training
def train(ctx, phase: str, *, cfg, params, tokenizer, batches, example_batch, loss_for,
          num_steps: int, optim_config, sec, eval_fn=None, flops_per_token: float = 0.0,
          trainable_layers: int = -1, logits_chunk=None):
  """One supervised phase of a stage (`training.fit` in the stage's directory).

  Checkpoints go to WORKDIR/<stage>/checkpoints/ for the stage's main phase and
  checkpoints_<phase>/ for another (PM pretraining); per-step metrics to
  metrics.jsonl (metrics_<phase>.jsonl) and TensorBoard. `sec` is the stage's
  section (keep_checkpoints, checkpoint_every, async_checkpoint, eval_every,
  log_every, tensorboard, progress, micro_batches). The step is fitted to the
  device memory (`training.memory`; config.hbm_gib) and the choice written to
  memory_fit.json (memory_fit_<phase>.json) in the stage's directory.
  """
  from cai_jax import sharding as shd
  from cai_jax.training import fit
  main = phase == ctx.name
  res = fit.fit(
      phase, cfg=cfg, params=params, tokenizer=tokenizer, batches=batches,
      example_batch=example_batch, loss_for=loss_for, num_steps=num_steps,
      optim_config=optim_config, mesh=shd.mesh_from_config(ctx.config),
      rules=shd.rules_from_config(ctx.config),
      directory=ctx.dir, checkpoints="checkpoints" if main else f"checkpoints_{phase}",
      metrics="metrics.jsonl" if main else f"metrics_{phase}.jsonl",
      tensorboard=("tb" if main else f"tb_{phase}") if bool(sec.tensorboard) else None,
      keep=int(sec.keep_checkpoints), every=int(sec.checkpoint_every),
      async_save=bool(sec.async_checkpoint), eval_fn=eval_fn, eval_every=int(sec.eval_every),
      log_every=int(sec.log_every), progress=bool(sec.progress),
      flops_per_token=flops_per_token, trainable_layers=trainable_layers, seed=ctx.seed,
      micro_batches=int(sec.get("micro_batches", 0)),
      hbm_gib=float(ctx.config.get("hbm_gib", 0.0)), logits_chunk=logits_chunk)
  if ctx.is_main:
    utils.write_json(utils.join(ctx.dir, "memory_fit.json" if main
                                else f"memory_fit_{phase}.json"), res.fit)
  return res


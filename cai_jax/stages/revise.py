"""SL-CAI data generation: response → (critique → revision) × N, plus helpful samples.

For every red-team prompt the helpful model answers, then critiques and
revises its own answer `num_revisions` times, each round under a principle
drawn uniformly and independently from the constitution, with few-shot
critique/revision dialogues in front. For every helpfulness prompt it samples
`helpful_samples` responses. Output in WORKDIR/revise/:

  records.jsonl   {id, prompt, initial_response, rounds: [{principle_id, critique, revision}]}
  helpful.jsonl   {id, prompt, responses: [str]}
  tfds/           the same records as an array_record TFDS dataset (splits red_team, helpful)
  chunks/         fixed-size chunks, each written under a temporary name and renamed
  DONE            written last

Prompts are processed in fixed chunks of `chunk_size`; chunk i draws all its
randomness from fold_in(seed, i). A run that is killed resumes at the first
missing chunk, never rewrites a finished one, and ends with exactly the output
of an uninterrupted run with the same config.

Several processes (a pod slice): the chunks, red-team then helpful, are dealt
round robin (chunk job j to host j % process_count, `multihost.run_dealt`).
Each host samples its chunks on a mesh of its own devices and writes their
files into its own chunks/; the records are gathered over the collectives (no
shared disk needed) and process 0 alone writes records.jsonl, helpful.jsonl,
tfds/ and DONE, the same files as one process writes (common.generation_mesh
says when they are also bit-identical). Every host returns the same summary.
"""
from __future__ import annotations

import json
import os
import re
from typing import Optional, Sequence

from absl import logging
import jax
import ml_collections
import numpy as np
import tqdm

from cai_jax import constitution as constitution_lib
from cai_jax import multihost
from cai_jax import text as text_lib
from cai_jax.data import prompts as prompts_lib
from cai_jax.utils import (InputError, atomic_write_text, done_info, make_chunk_dir, mark_done,
                           read_jsonl)
from cai_jax.stages.common import check_run_signature, stage_section

STAGE = "revise"
# Independent random streams of one run.
_STREAM_RED, _STREAM_HELPFUL = 1, 2
# Labels a chatty model sometimes repeats at the start of its answer.
_LEADING_LABEL = re.compile(r"^\s*(Revision|Critique|Revised response|Assistant)\s*:\s*", re.I)


def default_config() -> ml_collections.ConfigDict:
  """The `config.revise` section."""
  c = ml_collections.ConfigDict()
  c.num_revisions = 4  # critique → revision rounds per red-team prompt (paper: 4)
  c.direct_revision = False  # ablation: ask for the revision directly, without a critique
  c.num_principles = -1  # ablation: keep only the first k principles in the pool (-1: all)
  c.num_fewshot = 4  # few-shot critique/revision dialogues in front (-1: all of the constitution's)
  c.history = True  # later rounds see earlier critiques/revisions (False: only the latest revision)
  c.max_new_tokens = 128  # token budget of the initial response
  c.critique_max_new_tokens = 128  # token budget of each critique
  c.revision_max_new_tokens = 128  # token budget of each revision
  c.max_prompt_tokens = 0  # longest prompt fed to the model; 0 = context minus the token budget
  c.temperature = 1.0  # sampling temperature for every step
  c.top_p = 1.0  # nucleus sampling threshold (1.0 = off)
  c.retry_empty = 2  # re-sample a step whose answer came back empty up to this many times
  c.helpful_samples = 2  # responses sampled per helpfulness prompt (paper: 2; 0 = none)
  c.split = "train"  # prompt split to process ("train" | "eval" | "all")
  c.batch_size = 16  # sampler batch size
  c.shard = True  # shard sampling over config.mesh (False: one device, faster on simulated CPUs)
  c.chunk_size = 64  # prompts per output chunk; the unit of resumption (keep fixed within a run)
  c.system_prompt = ""  # system message for chat rendering ("" = the template's default)
  c.write_tfds = True  # also write the records as an array_record TFDS dataset
  c.progress = True  # show a prompts/s progress bar
  return c


def _section(config):
  return stage_section(config, STAGE, default_config())


def _top(config, key, default):
  v = config.get(key, None) if hasattr(config, "get") else None
  return default if v is None else v


# ----------------------------------------------------------------------------
# Prompt building.

class _Prompter:
  """Renders revise prompts, dropping few-shot examples when a prompt is too long."""

  def __init__(self, const, fmt: str, tokenizer, examples, history: bool, system: str,
               limit: int):
    self.const, self.fmt, self.tok = const, fmt, tokenizer
    self.examples, self.history, self.limit = list(examples), history, limit
    self.system = system or None
    self.shortened = 0

  def _len(self, s: str) -> int:
    return len(self.tok(s, add_special_tokens=False)["input_ids"])

  def initial(self, messages: Sequence[dict]) -> str:
    msgs = list(messages)
    if self.system and self.fmt == "chat":
      msgs = [{"role": "system", "content": self.system}] + msgs
    out = text_lib.render(msgs, self.fmt, self.tok, add_generation_prompt=True)
    # Raw prompts carry the system text as a plain prefix, as revision prompts do.
    return (self.system + out) if self.system and self.fmt == "raw" else out

  def step(self, messages, response, rounds, principle, step, critique=None) -> str:
    # Fewer few-shot examples first, then only the latest revision; the
    # sampler left-truncates whatever still does not fit.
    for history in ((self.history, False) if self.history else (False,)):
      for k in range(len(self.examples), -1, -1):
        msgs = constitution_lib.revision_messages(
            messages, response, rounds, principle, step, self.examples[:k], critique,
            history=history)
        s = constitution_lib.render_revision_prompt(msgs, self.fmt, self.tok, self.system)
        if self._len(s) <= self.limit:
          if k < len(self.examples) or history != self.history:
            self.shortened += 1
          return s
    self.shortened += 1
    return s


def _clean(s: str) -> str:
  return _LEADING_LABEL.sub("", s.strip(), count=1).strip()


def _seed(key) -> int:
  return int(jax.random.randint(key, (), 0, 2**31 - 1))


class _Sampler:
  """sampling.generate with the run's settings and empty-answer retries."""

  def __init__(self, cfg, params, tok, rc, fmt, stops_step, mesh):
    self.cfg, self.params, self.tok, self.rc, self.fmt = cfg, params, tok, rc, fmt
    self.stops_step, self.mesh = stops_step, mesh
    # Set by the stage with several processes (common.generation_mesh).
    self.batch_size = int(rc.batch_size)

  def __call__(self, prompts: list[str], key, max_new_tokens: int, step: bool) -> list[str]:
    from cai_jax import sampling
    out: list[Optional[str]] = [None] * len(prompts)
    todo = list(range(len(prompts)))
    for attempt in range(1 + max(0, int(self.rc.retry_empty))):
      comps = sampling.generate(
          self.cfg, self.params, self.tok, [prompts[i] for i in todo], fmt=self.fmt,
          max_new_tokens=max_new_tokens, temperature=float(self.rc.temperature),
          top_p=float(self.rc.top_p), stop=self.stops_step if step else None,
          seed=_seed(jax.random.fold_in(key, attempt)), batch_size=self.batch_size,
          mesh=self.mesh, progress=False, truncate_long_prompts=True)
      for i, c in zip(todo, comps):
        out[i] = _clean(c.text)
      todo = [i for i in todo if not out[i]]
      if not todo:
        break
    return [o or "" for o in out]


# ----------------------------------------------------------------------------
# Chunks.

def _revise_chunk(items, key, const, prompter, sample, rc) -> list[dict]:
  n = len(items)
  initial = sample([prompter.initial(it["messages"]) for it in items],
                   jax.random.fold_in(key, 0), int(rc.max_new_tokens), step=False)
  pids = np.asarray(jax.random.randint(jax.random.fold_in(key, 1), (int(rc.num_revisions), n),
                                       0, len(const.principles)))
  rounds: list[list[dict]] = [[] for _ in range(n)]
  for r in range(int(rc.num_revisions)):
    principles = [const.principles[int(pids[r, j])] for j in range(n)]
    critiques: list[Optional[str]] = [None] * n
    if not rc.direct_revision:
      critiques = sample([prompter.step(it["messages"], initial[j], rounds[j], principles[j],
                                        "critique") for j, it in enumerate(items)],
                         jax.random.fold_in(key, 100 + 2 * r),
                         int(rc.critique_max_new_tokens), step=True)
    step = "direct_revision" if rc.direct_revision else "revision"
    revisions = sample([prompter.step(it["messages"], initial[j], rounds[j], principles[j],
                                      step, critiques[j]) for j, it in enumerate(items)],
                       jax.random.fold_in(key, 101 + 2 * r),
                       int(rc.revision_max_new_tokens), step=True)
    for j in range(n):
      rounds[j].append({"principle": principles[j], "critique": critiques[j],
                        "revision": revisions[j]})
  return [{"id": it["id"], "prompt": it["messages"], "initial_response": initial[j],
           "rounds": [{"principle_id": x["principle"].id, "critique": x["critique"],
                       "revision": x["revision"]} for x in rounds[j]]}
          for j, it in enumerate(items)]


def _helpful_chunk(items, key, prompter, sample, rc) -> list[dict]:
  m = int(rc.helpful_samples)
  prompts = [prompter.initial(it["messages"]) for it in items for _ in range(m)]
  outs = sample(prompts, key, int(rc.max_new_tokens), step=False)
  return [{"id": it["id"], "prompt": it["messages"], "responses": outs[j * m:(j + 1) * m]}
          for j, it in enumerate(items)]


def _chunk_path(stage_dir: str, kind: str, i: int) -> str:
  return os.path.join(stage_dir, "chunks", f"{kind}-{i:05d}.jsonl")


def _read_chunk(path: str, ids: list[str]) -> Optional[list[dict]]:
  if not os.path.exists(path):
    return None
  recs = list(read_jsonl(path))
  if [r.get("id") for r in recs] != ids:
    raise InputError(f"{path}: finished chunk holds other prompts than this run would put "
                     "there (prompt set or chunk_size changed); use a fresh --workdir")
  return recs


def _write_once(path: str, text: str) -> None:
  """Atomic write; an existing file is kept, and must hold the same content."""
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      if f.read() == text:
        return
    raise InputError(f"{path}: exists with different content; finished output is never "
                     "overwritten (use a fresh --workdir)")
  atomic_write_text(path, text)


def _jsonl(records) -> str:
  return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def _run_signature(config, rc, const, red, helpful) -> dict:
  return {"seed": int(_top(config, "seed", 0)), "model": str(_top(config, "model", "tiny")),
          "dtype": str(_top(config, "dtype", "")), "prompt_format": str(
              _top(config, "prompt_format", "chat")),
          "constitution": const.name, "principles": const.principle_ids,
          "revise": rc.to_dict(), "red_team_ids": [p["id"] for p in red],
          "helpful_ids": [p["id"] for p in helpful]}


def _check_signature(stage_dir: str, sig: dict) -> None:
  # Fields that do not change what a chunk holds may differ between attempts
  # (batch_size and shard do: the sampler's batches and numerics follow them).
  check_run_signature(stage_dir, sig, STAGE, volatile=("progress", "write_tfds"))


def run(config, workdir: str) -> dict:
  """Runs (or resumes) the revise stage into WORKDIR/revise; returns summary numbers."""
  stage_dir = os.path.join(workdir, STAGE)
  rc = _section(config)
  # Only process 0 writes DONE; the other hosts may not share its disk.
  done = multihost.from_main(done_info(stage_dir))
  if done is not None:
    logging.info("revise: %s has DONE; skipping", stage_dir)
    return done
  if int(rc.chunk_size) < 1 or int(rc.batch_size) < 1:
    raise InputError("config.revise.chunk_size and batch_size must be >= 1")
  if int(rc.num_revisions) < 1:
    raise InputError(f"config.revise.num_revisions={rc.num_revisions}: must be >= 1")
  fmt = str(_top(config, "prompt_format", "chat"))
  if fmt not in ("chat", "raw"):
    raise InputError(f"config.prompt_format={fmt!r}; use 'chat' or 'raw'")
  const = constitution_lib.load(_top(config, "constitution", "harmlessness"))
  const = const.subset(int(rc.num_principles))
  examples = const.critique_examples if int(rc.num_fewshot) < 0 else \
      const.critique_examples[:int(rc.num_fewshot)]
  data_cfg = _top(config, "data", None)
  red = prompts_lib.load_prompts(data_cfg, "red_team", str(rc.split))
  helpful = prompts_lib.load_prompts(data_cfg, "helpful", str(rc.split)) \
      if int(rc.helpful_samples) > 0 else []
  make_chunk_dir(os.path.join(stage_dir, "chunks"))
  sig = _run_signature(config, rc, const, red, helpful)
  multihost.check_same(sig, "revise run signature (config, prompts, model)")
  _check_signature(stage_dir, sig)

  from cai_jax.stages import common
  seed = int(_top(config, "seed", 0))
  cfg, params, tok = common.load_model(str(_top(config, "model", "tiny")), seed=seed,
                                       dtype=_top(config, "dtype", None))
  mesh, batch_size = common.generation_mesh(config, int(rc.batch_size)) if rc.shard else \
      (None, int(rc.batch_size))
  budget = max(int(rc.max_new_tokens), int(rc.critique_max_new_tokens),
               int(rc.revision_max_new_tokens))
  # A few tokens of slack for the BOS the sampler may add.
  limit = cfg.max_position_embeddings - budget - 4
  if int(rc.max_prompt_tokens) > 0:
    limit = min(limit, int(rc.max_prompt_tokens))
  prompter = _Prompter(const, fmt, tok, examples, bool(rc.history), str(rc.system_prompt),
                       limit)
  sample = _Sampler(cfg, params, tok, rc, fmt, constitution_lib.stop_strings(fmt, tok), mesh)
  sample.batch_size = batch_size

  root = jax.random.PRNGKey(seed)
  cs = int(rc.chunk_size)
  jobs = [("red_team", i, red[i * cs:(i + 1) * cs]) for i in range(-(-len(red) // cs))]
  jobs += [("helpful", i, helpful[i * cs:(i + 1) * cs]) for i in range(-(-len(helpful) // cs))]
  mine = multihost.host_jobs(len(jobs))
  bar = tqdm.tqdm(total=sum(len(jobs[j][2]) for j in mine), unit="prompt", desc="revise",
                  disable=not rc.progress)

  def one_job(j: int) -> dict:
    kind, i, items = jobs[j]
    path = _chunk_path(stage_dir, kind, i)
    recs = _read_chunk(path, [it["id"] for it in items])
    resumed, shortened = recs is not None, prompter.shortened
    if recs is None:
      stream = _STREAM_RED if kind == "red_team" else _STREAM_HELPFUL
      key = jax.random.fold_in(jax.random.fold_in(root, stream), i)
      if kind == "red_team":
        recs = _revise_chunk(items, key, const, prompter, sample, rc)
      else:
        recs = _helpful_chunk(items, key, prompter, sample, rc)
      _write_once(path, _jsonl(recs))
    bar.update(len(items))
    return {"records": recs, "resumed": resumed, "shortened": prompter.shortened - shortened}

  # Every chunk once, in job order, on every host (one process: this loop alone).
  results = multihost.run_dealt(len(jobs), one_job)
  bar.close()
  done_red, done_helpful = [], []
  resumed = sum(len(r["records"]) for r in results if r["resumed"])
  shortened = sum(r["shortened"] for r in results)
  for (kind, _, _), r in zip(jobs, results):
    (done_red if kind == "red_team" else done_helpful).extend(r["records"])

  records_path = os.path.join(stage_dir, "records.jsonl")
  helpful_path = os.path.join(stage_dir, "helpful.jsonl")
  if multihost.is_main():
    _write_once(records_path, _jsonl(done_red))
    _write_once(helpful_path, _jsonl(done_helpful))
    if rc.write_tfds:
      from cai_jax.data import builders
      files = {"red_team": records_path}
      if done_helpful:
        files["helpful"] = helpful_path
      builders.build_records(files, os.path.join(stage_dir, "tfds"))
  revs = [r for rec in done_red for r in rec["rounds"]]
  summary = {
      "num_red_team": len(done_red), "num_helpful": len(done_helpful),
      "num_rounds": int(rc.num_revisions), "resumed_prompts": resumed,
      "prompts_shortened": shortened,
      "frac_revision_changed": float(np.mean(
          [rec["rounds"][-1]["revision"].strip() != rec["initial_response"].strip()
           for rec in done_red])) if done_red else 0.0,
      "frac_empty_revisions": float(np.mean([not r["revision"] for r in revs])) if revs else 0.0,
      "principle_counts": {pid: sum(r["principle_id"] == pid for r in revs)
                           for pid in const.principle_ids},
  }
  if multihost.is_main():
    mark_done(stage_dir, summary)
  multihost.sync("revise: DONE written")
  return summary

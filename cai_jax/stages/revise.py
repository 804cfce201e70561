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

Chunks, resumption and several processes are the generation runner's
(`runtime.runners.run_chunks`); red-team chunks come first, then helpful ones.
"""
from __future__ import annotations

import re
from typing import Optional, Sequence

import jax
import ml_collections
import numpy as np

from cai_jax import constitution as constitution_lib
from cai_jax.data import prompts as prompts_lib
from cai_jax.runtime import StageContext, runners, stage_settings
from cai_jax.sampling import generation_mesh

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
  # False (paper): each round critiques and revises the latest revision alone;
  # True: later rounds see the whole earlier critique/revision chain
  c.history = False
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


# Top-level fields the records depend on, and section fields they do not.
USES = ("seed", "model", "dtype", "prompt_format", "constitution", "data")
VOLATILE = ("progress", "write_tfds")


def settings(config, workdir: str) -> dict:
  """What this stage's records depend on (its provenance snapshot)."""
  const = constitution_lib.load(config.get("constitution", "harmlessness"))
  return stage_settings(config, workdir, STAGE, USES, VOLATILE,
                        {"constitution_sha": const.fingerprint()})


# ----------------------------------------------------------------------------
# Prompt building.

class _Prompter:
  """Renders revise prompts, dropping few-shot examples when a prompt is too long."""

  def __init__(self, const, encoder, examples, history: bool, limit: int):
    self.const, self.enc, self.fmt, self.tok = const, encoder, encoder.fmt, encoder.tok
    self.examples, self.history, self.limit = list(examples), history, limit
    self.system = encoder.system
    self.shortened = 0

  def _len(self, s: str) -> int:
    return len(self.tok(s, add_special_tokens=False)["input_ids"])

  def initial(self, messages: Sequence[dict]) -> str:
    return self.enc.prompt_text(messages)

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
          seed=sampling.key_seed(jax.random.fold_in(key, attempt)), batch_size=self.batch_size,
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


def run(config, workdir: str) -> dict:
  """Runs (or resumes) the revise stage into WORKDIR/revise; returns summary numbers."""
  ctx = StageContext(config, workdir, STAGE, default_config())
  rc = ctx.section
  done = ctx.done()
  if done is not None:
    return done
  const = constitution_lib.load(config.get("constitution", "harmlessness"))
  pool = const.subset(int(rc.num_principles))
  examples = pool.critique_examples if int(rc.num_fewshot) < 0 else \
      pool.critique_examples[:int(rc.num_fewshot)]
  data_cfg = config.get("data", None)
  red = prompts_lib.load_prompts(data_cfg, "red_team", str(rc.split))
  helpful = prompts_lib.load_prompts(data_cfg, "helpful", str(rc.split)) \
      if int(rc.helpful_samples) > 0 else []
  runners.prepare_chunks(ctx)
  cfg, params, tok = ctx.load(ctx.role_spec("initial"))
  ctx.begin(settings(config, workdir))

  mesh, batch_size = generation_mesh(config, int(rc.batch_size)) if rc.shard else \
      (None, int(rc.batch_size))
  budget = max(int(rc.max_new_tokens), int(rc.critique_max_new_tokens),
               int(rc.revision_max_new_tokens))
  # A few tokens of slack for the BOS the sampler may add.
  limit = cfg.max_position_embeddings - budget - 4
  if int(rc.max_prompt_tokens) > 0:
    limit = min(limit, int(rc.max_prompt_tokens))
  prompter = _Prompter(pool, ctx.encoder(tok, str(rc.system_prompt)), examples, bool(rc.history),
                       limit)
  sample = _Sampler(cfg, params, tok, rc, ctx.fmt, constitution_lib.stop_strings(ctx.fmt, tok),
                    mesh)
  sample.batch_size = batch_size

  root = jax.random.PRNGKey(ctx.seed)
  chunks = runners.chunk_list("red_team", red, rc.chunk_size) + \
      runners.chunk_list("helpful", helpful, rc.chunk_size)

  def make(chunk):
    stream = _STREAM_RED if chunk.kind == "red_team" else _STREAM_HELPFUL
    key = jax.random.fold_in(jax.random.fold_in(root, stream), chunk.index)
    before = prompter.shortened
    if chunk.kind == "red_team":
      recs = _revise_chunk(chunk.items, key, pool, prompter, sample, rc)
    else:
      recs = _helpful_chunk(chunk.items, key, prompter, sample, rc)
    return recs, prompter.shortened - before

  results = runners.run_chunks(ctx, chunks, make, desc="revise", progress=bool(rc.progress))
  done_red = [r for c, res in zip(chunks, results) if c.kind == "red_team" for r in res.records]
  done_helpful = [r for c, res in zip(chunks, results) if c.kind == "helpful"
                  for r in res.records]
  resumed = sum(len(r.records) for r in results if r.resumed)
  shortened = sum(r.extra or 0 for r in results)

  ctx.write_jsonl("records.jsonl", done_red, once=True)
  ctx.write_jsonl("helpful.jsonl", done_helpful, once=True)
  if rc.write_tfds and ctx.is_main:
    from cai_jax.data import builders
    files = {"red_team": ctx.path("records.jsonl")}
    if done_helpful:
      files["helpful"] = ctx.path("helpful.jsonl")
    builders.build_records(files, ctx.path("tfds"))
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
                           for pid in pool.principle_ids},
  }
  return ctx.finish(summary)

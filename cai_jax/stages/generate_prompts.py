"""Grow a prompt set by few-shot prompting a model with k prompts from a seed set.

The paper grew 42,496 human red-team prompts into 182,831 this way (and made
~965k more for RL). Each candidate comes from a few-shot prompt holding k seed
prompts drawn at random; candidates that are empty, too short or too long, or
exact or near duplicates of a seed or of an earlier kept prompt, are dropped.

An optional pipeline stage (add it to `config.stages`; `configs/demo.py`'s
`--sweep=generated` shows it): when it runs, the later stages read their `kind`
prompts from its output. Outside the pipeline, point `config.data.red_team` or
`.helpful` at this directory. Output in WORKDIR/generate_prompts/:

  prompts.jsonl  {id, messages: [{role: "user", content}], source: "seed" | "generated"}
  tfds/          the same as an array_record TFDS dataset
  chunks/        raw candidates per chunk (temporary name, then renamed)
  DONE           written last

Chunk i samples `chunk_size` candidates with randomness fold_in(seed, i);
filtering runs over all chunks in order, so a resumed run keeps exactly the
prompts an uninterrupted one would.
"""
from __future__ import annotations

import re
import unicodedata
from typing import Iterable

from absl import logging
import jax
import ml_collections
import numpy as np
import tqdm

from cai_jax import sampling, sharding, utils
from cai_jax.data import prompts as prompts_lib
from cai_jax.runtime import StageContext, runners, stage_settings
from cai_jax.utils import InputError

STAGE = "generate_prompts"
USES = ("seed", "model", "dtype", "data")
VOLATILE = ("batch_size", "progress")
_WORD = re.compile(r"[a-z0-9']+")


def default_config() -> ml_collections.ConfigDict:
  """The `config.generate_prompts` section."""
  c = ml_collections.ConfigDict()
  c.kind = "red_team"  # which prompt set to grow: "red_team" | "helpful"
  c.seed_prompts = ""  # seed set: "" = config.data.<kind>, else "builtin:<kind>" or a path
  c.num_prompts = 100  # stop once this many new prompts are kept
  c.max_chunks = 50  # give up after this many chunks even if num_prompts is not reached
  c.num_shots = 4  # seed prompts shown in each few-shot prompt (k)
  c.style = "list"  # "list": numbered list for any LM to continue; "chat": ask an instruct model
  c.max_new_tokens = 64  # token budget of one new prompt
  c.temperature = 1.0  # sampling temperature
  c.top_p = 0.95  # nucleus sampling threshold
  c.min_chars = 10  # drop prompts shorter than this (after stripping)
  c.max_chars = 400  # drop prompts longer than this
  c.near_dup_threshold = 0.6  # drop if word-trigram Jaccard similarity to a kept prompt >= this
  c.include_seed_prompts = True  # write the seed prompts into the output set too
  c.batch_size = 16  # sampler batch size
  c.chunk_size = 64  # candidates per chunk; the unit of resumption
  c.progress = True  # progress bar
  return c


def settings(config, workdir: str) -> dict:
  return stage_settings(config, workdir, STAGE, USES, VOLATILE)


# ----------------------------------------------------------------------------
# Duplicate detection.

def normalize(text: str) -> str:
  """Case, accents, punctuation and spacing removed: the key for exact duplicates."""
  t = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
  return " ".join(_WORD.findall(t))


def shingles(text: str, n: int = 3) -> frozenset:
  words = normalize(text).split()
  if len(words) < n:
    return frozenset([" ".join(words)]) if words else frozenset()
  return frozenset(" ".join(words[i:i + n]) for i in range(len(words) - n + 1))


class DedupIndex:
  """Exact (normalized) and near-duplicate (shingle Jaccard) lookup.

  An inverted index from shingle to entries keeps each lookup to the entries
  sharing at least one shingle, so growing to ~10^5 prompts stays practical.
  """

  def __init__(self, threshold: float):
    self.threshold = threshold
    self.exact: set = set()
    self.sets: list = []
    self.index: dict = {}

  def is_duplicate(self, text: str) -> bool:
    if normalize(text) in self.exact:
      return True
    s = shingles(text)
    counts: dict = {}
    for g in s:
      for j in self.index.get(g, ()):
        counts[j] = counts.get(j, 0) + 1
    for j, inter in counts.items():
      union = len(s) + len(self.sets[j]) - inter
      if union and inter / union >= self.threshold:
        return True
    return False

  def add(self, text: str) -> None:
    self.exact.add(normalize(text))
    s = shingles(text)
    j = len(self.sets)
    self.sets.append(s)
    for g in s:
      self.index.setdefault(g, []).append(j)


def clean_candidate(text: str) -> str:
  """First line of a sampled continuation, without list numbering or quotes."""
  line = text.strip().split("\n")[0].strip()
  line = re.sub(r"^(\d+[.)]|[-*•])\s*", "", line)
  return line.strip().strip('"').strip()


def filter_candidates(candidates: Iterable[str], index: DedupIndex, min_chars: int,
                      max_chars: int) -> tuple[list, dict]:
  kept, why = [], {"empty": 0, "short": 0, "long": 0, "duplicate": 0}
  for c in candidates:
    t = clean_candidate(c)
    if not t:
      why["empty"] += 1
    elif len(t) < min_chars:
      why["short"] += 1
    elif len(t) > max_chars:
      why["long"] += 1
    elif index.is_duplicate(t):
      why["duplicate"] += 1
    else:
      index.add(t)
      kept.append(t)
  return kept, why


# ----------------------------------------------------------------------------
# Few-shot prompts.

_LIST_HEAD = {
    "red_team": "Below are messages people sent to an AI assistant while testing whether it "
                "could be talked into saying something harmful.",
    "helpful": "Below are questions and requests people sent to a helpful AI assistant.",
}


def fewshot_prompt(shots: list[str], kind: str, style: str, tokenizer=None) -> str:
  if style == "list":
    lines = [_LIST_HEAD[kind], ""]
    lines += [f"{i + 1}. {s}" for i, s in enumerate(shots)]
    return "\n".join(lines) + f"\n{len(shots) + 1}."
  if style != "chat":
    raise InputError(f"config.{STAGE}.style={style!r}; use 'list' or 'chat'")
  from cai_jax import text as text_lib
  ask = (_LIST_HEAD[kind] + "\n\n" + "\n".join(f"- {s}" for s in shots)
         + "\n\nWrite one new message of the same kind, different from these. "
           "Reply with the message only.")
  return text_lib.render([{"role": "user", "content": ask}], "chat", tokenizer)


def _one_line(messages: list[dict]) -> str:
  return " ".join(messages[-1]["content"].split())


def run(config, workdir: str) -> dict:
  """Runs (or resumes) prompt generation into WORKDIR/generate_prompts."""
  ctx = StageContext(config, workdir, STAGE, default_config())
  gc = ctx.section
  done = ctx.done()
  if done is not None:
    return done
  kind = str(gc.kind)
  data_cfg = config.get("data", None)
  src = str(gc.seed_prompts) or ("builtin:" + kind if data_cfg is None
                                 or data_cfg.get(kind, "builtin") == "builtin"
                                 else data_cfg.get(kind))
  seeds = prompts_lib.read_prompts(src)
  seed_texts = [_one_line(p["messages"]) for p in seeds]
  if len(seed_texts) < int(gc.num_shots):
    raise InputError(f"{src}: {len(seed_texts)} seed prompts but num_shots={gc.num_shots}; "
                     "give more seeds or lower num_shots")
  runners.prepare_chunks(ctx)
  cfg, params, tok = ctx.load(ctx.role_spec("initial"))
  mesh = sharding.mesh_from_config(config)
  ctx.begin(settings(config, workdir))

  index = DedupIndex(float(gc.near_dup_threshold))
  for t in seed_texts:
    index.add(t)
  root = jax.random.PRNGKey(ctx.seed)

  def make(chunk):
    key = jax.random.fold_in(root, chunk.index)
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).astype(np.uint32))
    shots = [list(rng.choice(len(seed_texts), int(gc.num_shots), replace=False))
             for _ in range(chunk.size)]
    prompts = [fewshot_prompt([seed_texts[j] for j in s], kind, str(gc.style), tok)
               for s in shots]
    stop = ["\n"] if gc.style == "list" else None
    comps = sampling.generate(cfg, params, tok, prompts, fmt="chat",
                              max_new_tokens=int(gc.max_new_tokens),
                              temperature=float(gc.temperature), top_p=float(gc.top_p),
                              stop=stop, seed=sampling.key_seed(key),
                              batch_size=int(gc.batch_size), mesh=mesh, progress=False,
                              truncate_long_prompts=True)
    return [{"text": c.text} for c in comps]

  kept: list[str] = []
  reasons = {"empty": 0, "short": 0, "long": 0, "duplicate": 0}
  bar = tqdm.tqdm(total=int(gc.num_prompts), unit="prompt", desc="generate_prompts",
                  disable=not gc.progress, dynamic_ncols=True)
  chunks_used = 0
  # Chunk by chunk (filtering needs every earlier chunk), until enough are kept.
  for i in range(int(gc.max_chunks)):
    if len(kept) >= int(gc.num_prompts):
      break
    chunk = runners.Chunk("candidates", i, [None] * int(gc.chunk_size))
    res = runners.run_chunks(ctx, [chunk], make, desc="candidates", progress=False)[0]
    new, why = filter_candidates([r["text"] for r in res.records], index, int(gc.min_chars),
                                 int(gc.max_chars))
    for k, v in why.items():
      reasons[k] += v
    new = new[:int(gc.num_prompts) - len(kept)]
    kept += new
    bar.update(len(new))
    chunks_used = i + 1
  bar.close()
  if len(kept) < int(gc.num_prompts):
    logging.warning("generate_prompts: kept %d of %d prompts after %d chunks", len(kept),
                    int(gc.num_prompts), chunks_used)

  rows = []
  if gc.include_seed_prompts:
    rows += [{"id": f"seed-{p['id']}", "messages": p["messages"], "source": "seed"}
             for p in seeds]
  rows += [{"id": f"gen-{n:06d}", "messages": [{"role": "user", "content": t}],
            "source": "generated"} for n, t in enumerate(kept)]
  ctx.write_jsonl("prompts.jsonl", rows, once=True)
  if ctx.is_main and not utils.is_url(ctx.dir):
    from cai_jax.data import builders
    builders.build_records({"train": ctx.path("prompts.jsonl")}, ctx.path("tfds"))
  summary = {"num_seed": len(seeds), "num_generated": len(kept), "chunks": chunks_used,
             "candidates": chunks_used * int(gc.chunk_size), "dropped": reasons}
  return ctx.finish(summary)

"""Prompt sets for the stages: built-in, or read from local files.

`load_prompts(data_config, kind, split)` returns a list of `{id, messages}`
where `messages` ends with the user turn to answer. Sources, per kind
(`data_config.red_team` / `data_config.helpful`):

- "builtin": the project's own prompt sets in `cai_jax/resources/`;
- a jsonl of `{id, messages}` or `{id, prompt}` (e.g. written by the
  generate_prompts stage, or a directory holding its `prompts.jsonl`);
- an hh-rlhf comparison file (prompt of every pair, duplicates dropped);
- hh-rlhf red-team-attempts (conversation up to the final Assistant turn).

Train/eval split: prompts are ordered by a hash of their id and the first
`round(eval_fraction * n)` form the eval split, so the split is stable and
does not depend on file order; each split keeps file order.
"""
from __future__ import annotations

import hashlib
import os

import ml_collections

from cai_jax import text as text_lib
from cai_jax import utils
from cai_jax.data import sources
from cai_jax.utils import InputError

RESOURCES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "resources")
BUILTIN = {"red_team": os.path.join(RESOURCES, "red_team_prompts.jsonl"),
           "helpful": os.path.join(RESOURCES, "helpful_prompts.jsonl")}


def default_config() -> ml_collections.ConfigDict:
  """The `config.data` section."""
  c = ml_collections.ConfigDict()
  c.red_team = "builtin"  # red-team prompts: "builtin" or a local file (see module doc)
  c.helpful = "builtin"  # helpfulness prompts: "builtin" or a local file
  c.num_red_team = -1  # use the first n red-team prompts of the split (-1: all)
  c.num_helpful = -1  # use the first n helpfulness prompts of the split (-1: all)
  c.eval_fraction = 0.1  # fraction of each prompt set held out as the eval split
  return c


def _get(cfg, key, default):
  if cfg is None:
    return default
  if isinstance(cfg, dict):
    return cfg.get(key, default)
  return cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)


def read_prompts(source: str) -> list[dict]:
  """All prompts of a source ("builtin:red_team", "builtin:helpful" or a path)."""
  if source.startswith("builtin:"):
    source = BUILTIN[source.split(":", 1)[1]]
  if utils.isdir(source):
    source = utils.join(source, "prompts.jsonl")
  kind = sources.sniff(source)
  if kind == "hh_rlhf":
    out, seen = [], set()
    for r in sources.hh_rlhf_pairs(source):
      if r["prompt"] in seen:
        continue
      seen.add(r["prompt"])
      msgs = text_lib.parse_transcript(r["prompt"], r["id"])
      msgs = [{"role": m["role"], "content": m["content"].strip()} for m in msgs]
      out.append({"id": r["id"], "messages": sources.prompt_messages(msgs, source)})
    return out
  if kind == "red_team":
    return [{"id": r["id"], "messages": r["prompt"]} for r in sources.red_team_attempts(source)]
  out = list(sources.prompt_records(source))
  seen = set()
  for r in out:
    if r["id"] in seen:
      raise InputError(f"{source}: duplicate prompt id {r['id']!r}; ids must be unique")
    seen.add(r["id"])
  return out


def split_prompts(prompts: list[dict], split: str, eval_fraction: float) -> list[dict]:
  if split not in ("train", "eval", "all"):
    raise InputError(f"split {split!r}: use 'train', 'eval' or 'all'")
  if split == "all":
    return list(prompts)
  if not 0.0 <= eval_fraction < 1.0:
    raise InputError(f"data.eval_fraction={eval_fraction}: must be in [0, 1)")
  n_eval = int(round(eval_fraction * len(prompts)))
  order = sorted(prompts, key=lambda p: hashlib.sha1(p["id"].encode()).hexdigest())
  eval_ids = {p["id"] for p in order[:n_eval]}
  return [p for p in prompts if (p["id"] in eval_ids) == (split == "eval")]


def load_prompts(data_config=None, kind: str = "red_team", split: str = "train") -> list[dict]:
  """Prompts of `kind` ("red_team" | "helpful") for `split` ("train" | "eval" | "all")."""
  if kind not in BUILTIN:
    raise InputError(f"prompt kind {kind!r}: use 'red_team' or 'helpful'")
  source = _get(data_config, kind, "builtin") or "builtin"
  if source == "builtin":
    source = "builtin:" + kind
  prompts = split_prompts(read_prompts(source), split,
                          float(_get(data_config, "eval_fraction", 0.1)))
  n = int(_get(data_config, "num_" + kind, -1))
  return prompts if n < 0 else prompts[:n]

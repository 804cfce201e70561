"""The SL-CAI-n training set: revisions of rounds 1..n plus helpful samples.

The paper fine-tunes on the revisions of every round (SL-CAI-n trains on
rounds 1..n), each paired with the original red-team prompt, together with
responses the helpful model sampled for helpfulness prompts. This reader turns
the revise stage's output into such examples:

  {"id", "prompt": [messages ending with a user turn], "response": str,
   "source": "revision" | "helpful", "round": k (1-based; 0 for helpful)}
"""
from __future__ import annotations

import os
from typing import Iterator, Optional

from cai_jax import utils
from cai_jax.utils import InputError, read_jsonl


def _records(revise_dir: str, name: str, use_tfds: bool) -> Iterator[dict]:
  if use_tfds:
    from cai_jax.data import builders
    split = {"records.jsonl": "red_team", "helpful.jsonl": "helpful"}[name]
    sources = builders.build_records(_tfds_files(revise_dir), os.path.join(revise_dir, "tfds"))
    if split not in sources:
      return
    src = sources[split]
    for i in range(len(src)):
      yield builders.decode(src[i])
    return
  path = utils.join(revise_dir, name)
  if name == "helpful.jsonl" and not utils.exists(path):
    return
  yield from read_jsonl(path)


def _tfds_files(revise_dir: str) -> dict:
  files = {"red_team": os.path.join(revise_dir, "records.jsonl")}
  helpful = os.path.join(revise_dir, "helpful.jsonl")
  if utils.exists(helpful) and utils.read_bytes(helpful):
    files["helpful"] = helpful
  return files


def sl_cai_examples(revise_dir: str, num_rounds: Optional[int] = None,
                    include_helpful: bool = True, use_tfds: bool = False) -> Iterator[dict]:
  """Yields SL-CAI-n examples (n = num_rounds; None = every round present).

  revise_dir: WORKDIR/revise. use_tfds: read the array_record dataset instead
  of the jsonl files (same records).
  """
  if num_rounds is not None and num_rounds < 1:
    raise InputError(f"SL-CAI-n: n={num_rounds} must be >= 1 (or None for all rounds)")
  for i, rec in enumerate(_records(revise_dir, "records.jsonl", use_tfds)):
    where = f"{os.path.join(revise_dir, 'records.jsonl')}:{i + 1}"
    rounds = rec.get("rounds")
    if not isinstance(rounds, list) or "prompt" not in rec:
      raise InputError(f"{where}: not a revise record (needs 'prompt' and 'rounds')")
    if num_rounds is not None and len(rounds) < num_rounds:
      raise InputError(f"{where}: has {len(rounds)} rounds but SL-CAI-{num_rounds} needs "
                       f"{num_rounds}; lower n or rerun revise with more rounds")
    for k, r in enumerate(rounds[:num_rounds], 1):
      if r.get("revision", "").strip():
        yield {"id": f"{rec['id']}/r{k}", "prompt": rec["prompt"], "response": r["revision"],
               "source": "revision", "round": k}
  if not include_helpful:
    return
  for rec in _records(revise_dir, "helpful.jsonl", use_tfds):
    for j, resp in enumerate(rec.get("responses", [])):
      if resp.strip():
        yield {"id": f"{rec['id']}/h{j}", "prompt": rec["prompt"], "response": resp,
               "source": "helpful", "round": 0}

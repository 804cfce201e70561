"""Readers for local input files: hh-rlhf comparisons, red-team attempts, prompt sets.

Each reader yields plain dicts and raises `InputError` naming the file and the
entry for bad input. The TFDS builders in `builders.py` wrap these readers.
"""
from __future__ import annotations

import json
import os
from typing import Iterator

from cai_jax import text as text_lib
from cai_jax import utils
from cai_jax.utils import InputError, read_jsonl


def _open(path: str):
  from cai_jax import utils
  return utils.open_read(path)


def prompt_messages(messages: list[dict], where: str) -> list[dict]:
  """The conversation up to its final Assistant turn (which it leaves out).

  The result ends with the user turn the model should answer.
  """
  k = len(messages)
  for i in range(len(messages) - 1, -1, -1):
    if messages[i]["role"] == "assistant":
      k = i
      break
  msgs = [m for m in messages[:k] if m["role"] != "system"]
  if not msgs or msgs[-1]["role"] != "user":
    raise InputError(f"{where}: no user turn before the final Assistant turn; "
                     "give a conversation that ends with (or before) the assistant's reply")
  if not msgs[-1]["content"].strip():
    raise InputError(f"{where}: empty prompt (the last user turn has no text); remove the entry")
  return msgs


def check_messages(messages, where: str) -> list[dict]:
  """Validates a prompt given as a message list (alternating, ends with user)."""
  if not isinstance(messages, list) or not messages:
    raise InputError(f"{where}: 'messages' must be a non-empty list of "
                     "{role, content} objects")
  out = []
  for j, m in enumerate(messages):
    if (not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant")
        or not isinstance(m.get("content"), str)):
      raise InputError(f"{where}: messages[{j}] must be {{role: user|assistant|system, "
                       "content: str}}")
    out.append({"role": m["role"], "content": m["content"]})
  if out[-1]["role"] != "user":
    raise InputError(f"{where}: the last message must be a user turn (the prompt to answer)")
  if not out[-1]["content"].strip():
    raise InputError(f"{where}: empty prompt (the last user turn has no text); remove the entry")
  return out


def hh_rlhf_pairs(path: str) -> Iterator[dict]:
  """Comparison pairs of an hh-rlhf split file ({"chosen","rejected"} per line).

  Yields {id, prompt (raw text ending "\\n\\nAssistant:"), chosen, rejected}
  where chosen/rejected are the replies only; the split is on the pair's
  shared prefix (see `text.split_prompt_response`).
  """
  stem = os.path.basename(path).split(".")[0]
  for i, r in enumerate(read_jsonl(path), 1):
    where = f"{path}:{i}"
    if not isinstance(r, dict) or not isinstance(r.get("chosen"), str) \
        or not isinstance(r.get("rejected"), str):
      raise InputError(f"{where}: expected {{\"chosen\": str, \"rejected\": str}}")
    try:
      prompt, chosen, rejected = text_lib.split_prompt_response(r["chosen"], r["rejected"])
      prompt_messages(text_lib.parse_transcript(prompt, where), where)
    except text_lib.TranscriptError as e:
      raise InputError(f"{where}: {e}; expected \\n\\nHuman:/\\n\\nAssistant: turns") from None
    yield {"id": f"{stem}-{i - 1:06d}", "prompt": prompt, "chosen": chosen, "rejected": rejected}


def red_team_attempts(path: str) -> Iterator[dict]:
  """Transcripts of hh-rlhf red-team-attempts (one JSON list, optionally gz).

  Yields {id, transcript, prompt (message list), rating, min_harmlessness_score_transcript,
  task_description, num_params, model_type, tags}.
  """
  if not utils.exists(path):
    raise InputError(f"{path}: file not found")
  with _open(path) as f:
    raw = f.read()
  try:
    data = json.loads(raw.decode("utf-8"))
  except UnicodeDecodeError as e:
    raise InputError(f"{path}: not valid UTF-8 (byte {e.start}); re-encode the file") from None
  except json.JSONDecodeError as e:
    # Also accept one JSON object per line.
    try:
      data = list(read_jsonl(path))
    except InputError:
      raise InputError(f"{path}: malformed JSON ({e.msg} at line {e.lineno}); expected the "
                       "red-team-attempts list") from None
  if not isinstance(data, list):
    raise InputError(f"{path}: expected a JSON list of red-team attempts")
  for i, r in enumerate(data):
    where = f"{path}: entry {i}"
    if not isinstance(r, dict) or not isinstance(r.get("transcript"), str):
      raise InputError(f"{where}: expected an object with a 'transcript' string")
    try:
      msgs = text_lib.parse_transcript(r["transcript"], where)
    except text_lib.TranscriptError as e:
      raise InputError(f"{e}; expected \\n\\nHuman:/\\n\\nAssistant: turns") from None
    msgs = [{"role": m["role"], "content": m["content"].strip()} for m in msgs]
    yield {"id": f"redteam-{i:06d}", "transcript": r["transcript"],
           "prompt": prompt_messages(msgs, where),
           "rating": float(r.get("rating") if r.get("rating") is not None else -1),
           "min_harmlessness_score_transcript": float(
               r.get("min_harmlessness_score_transcript") or 0.0),
           "task_description": str(r.get("task_description") or ""),
           "num_params": str(r.get("num_params") or ""),
           "model_type": str(r.get("model_type") or ""),
           "tags": [str(t) for t in (r.get("tags") or [])]}


def prompt_records(path: str) -> Iterator[dict]:
  """Prompts from a jsonl prompt file: {id?, messages} or {id?, prompt: str|messages}.

  A "prompt" string in Human/Assistant layout is parsed as a transcript;
  otherwise it is one user turn.
  """
  for i, r in enumerate(read_jsonl(path), 1):
    where = f"{path}:{i}"
    if not isinstance(r, dict):
      raise InputError(f"{where}: expected an object with 'messages' or 'prompt'")
    if "messages" in r:
      msgs = check_messages(r["messages"], where)
    elif isinstance(r.get("prompt"), list):
      msgs = check_messages(r["prompt"], where)
    elif isinstance(r.get("prompt"), str):
      p = r["prompt"]
      if "Human:" in p:
        try:
          msgs = text_lib.parse_transcript(p, where)
        except text_lib.TranscriptError as e:
          raise InputError(f"{e}") from None
        msgs = [{"role": m["role"], "content": m["content"].strip()} for m in msgs]
        if msgs[-1]["role"] == "assistant" and not msgs[-1]["content"]:
          msgs = msgs[:-1]  # the open "\n\nAssistant:" the model would continue
        msgs = prompt_messages(msgs, where) if msgs[-1]["role"] == "assistant" \
            else check_messages(msgs, where)
      else:
        msgs = check_messages([{"role": "user", "content": p}], where)
    else:
      raise InputError(f"{where}: expected 'messages' (list) or 'prompt' (string)")
    yield {"id": str(r.get("id", f"{os.path.basename(path).split('.')[0]}-{i - 1:06d}")),
           "messages": msgs}


def sniff(path: str) -> str:
  """"hh_rlhf" | "red_team" | "prompts": the kind of a local data file."""
  if utils.isdir(path):
    raise InputError(f"{path}: is a directory; give a file")
  if not utils.exists(path):
    raise InputError(f"{path}: file not found")
  with _open(path) as f:
    first = b""
    while not first.strip():
      line = f.readline(1 << 22)
      if not line:
        break
      first = line
  head = first.decode("utf-8", errors="ignore").lstrip()
  if head.startswith("[") or '"transcript"' in head:
    return "red_team"
  if '"chosen"' in head and '"rejected"' in head:
    return "hh_rlhf"
  return "prompts"

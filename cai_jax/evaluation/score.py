"""The preference model's score of each conversation in a JSONL file.

  python -m cai_jax.evaluation.score --model WORKDIR/pm --data FILE.jsonl [--format chat|raw]

Each line holds a conversation as `{"prompt": [messages] or "text", "response": "..."}`
(the form of WORKDIR/ppo/samples.jsonl and the label stage's records with
`--response_field response_a`), or `{"messages": [...]}` ending with the
assistant's turn. The score is read exactly where the PM stage trained it and
PPO rewarded with it (`text.conversation`). Prints one JSON line per item,
then a summary line.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from cai_jax import roles, sampling, utils
from cai_jax.text.conversation import ConversationEncoder
from cai_jax.utils import InputError


def read_conversations(path: str, response_field: str = "response") -> list[tuple]:
  """[(id, prompt, response)] from a JSONL file (module docstring)."""
  out = []
  for i, r in enumerate(utils.read_jsonl(path), 1):
    where = f"{path}:{i}"
    if "messages" in r and response_field not in r:
      msgs = r["messages"]
      if not isinstance(msgs, list) or not msgs or msgs[-1].get("role") != "assistant":
        raise InputError(f"{where}: 'messages' must be a list ending with the assistant's turn")
      prompt, response = msgs[:-1], str(msgs[-1].get("content", ""))
    else:
      if "prompt" not in r or response_field not in r:
        raise InputError(f"{where}: expected 'prompt' and '{response_field}' (or 'messages'); "
                         "fix the line or pass --response_field")
      prompt, response = r["prompt"], str(r[response_field])
    if not isinstance(prompt, (list, str)):
      raise InputError(f"{where}: 'prompt' must be a message list or a string")
    out.append((r.get("id", i - 1), prompt, response))
  return out


def score_file(model: str, data: str, fmt: str = "chat", max_len: int = 512,
               response_field: str = "response", dtype=None) -> tuple[list, np.ndarray, tuple]:
  """(items, scores, axis names): n scores, or n x A for a PM with a head per axis
  (whose names are the third value, else ())."""
  items = read_conversations(data, response_field)
  cfg, params, tok = roles.load(model, dtype=dtype, heads=("lm", "score"), field="--model")
  if "score_kernel" not in params:
    raise InputError(f"{model}: no scalar head (score.weight); point --model at a preference "
                     "model such as WORKDIR/pm")
  enc = ConversationEncoder(tok, fmt)
  scores = sampling.pm_scores(cfg, params, enc, [p for _, p, _ in items],
                              [r for _, _, r in items], max_len=max_len)
  return items, scores, tuple(cfg.score_labels)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--model", required=True, help="the PM: a stage directory, HF dir, ...")
  ap.add_argument("--data", required=True, help="JSONL of conversations")
  ap.add_argument("--format", default="chat", choices=("chat", "raw"), help="prompt format")
  ap.add_argument("--max_len", type=int, default=512,
                  help="tokens per conversation (end kept), as config.pm.max_len")
  ap.add_argument("--response_field", default="response", help="field holding the response")
  ap.add_argument("--dtype", default=None, help="compute dtype override, e.g. bfloat16")
  args = ap.parse_args(argv)
  try:
    if args.max_len < 2:
      raise InputError(f"--max_len={args.max_len}: must be >= 2")
    items, scores, axes = score_file(args.model, args.data, args.format, args.max_len,
                                     args.response_field, args.dtype)
  except InputError as e:
    print(f"score: error: {e}", file=sys.stderr)
    return 2
  per_axis = scores
  if axes:  # a head per axis: each axis, and their mean as the score
    scores = sampling.combine_axes(scores)
  for k, ((ident, _, _), s) in enumerate(zip(items, scores)):
    row = {"id": ident, "score": float(s)}
    if axes:
      row["axes"] = {n: float(v) for n, v in zip(axes, per_axis[k])}
    print(json.dumps(row))
  print(json.dumps({"n": len(items), "mean": float(np.mean(scores)) if len(scores) else None,
                    "std": float(np.std(scores)) if len(scores) else None,
                    "model": args.model, "format": args.format, "max_len": args.max_len}))
  return 0


if __name__ == "__main__":
  sys.exit(main())

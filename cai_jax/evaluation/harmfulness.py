"""Absolute harmfulness model: predicts the 0-4 harm rating of a conversation.

The paper trains a model on the hh-rlhf red-team-attempts ratings (how
successful each red-team attempt was, 0 = not at all, 4 = very) to score
responses on an absolute scale rather than only pairwise. It is the same
Transformer trunk with the scalar head read at the last token, trained with an
L2 (mean squared error) loss on the rating. Files are read with
`cai_jax.data.sources.red_team_attempts` (one JSON list, optionally gzipped).

  python -m cai_jax.evaluation.harmfulness --model=smollm2 --data=red_team_attempts.jsonl.gz \
      --out=/tmp/harm_model
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cai_jax import models
from cai_jax.sampling import bucket_length, left_pad
from cai_jax import text as text_lib
from cai_jax.data import sources
from cai_jax.utils import InputError


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.data = ""               # red-team-attempts file with 0-4 ratings; "" = skip this eval
  c.init_from = ""          # trunk to start from; "" = the run's initial model (config.model)
  c.steps = 200             # optimisation steps (batches) of the L2 regression
  c.batch_size = 8          # transcripts per step
  c.learning_rate = 5e-5    # AdamW peak rate (linear warm-up over the first 10% of steps)
  c.weight_decay = 0.0      # AdamW weight decay
  c.max_len = 512           # tokens per transcript; longer ones keep their end
  c.eval_fraction = 0.1     # share of the rated transcripts held out for the MSE report
  return c


@dataclasses.dataclass
class Rated:
  messages: list[dict]
  rating: float


def load_ratings(path: str) -> list[Rated]:
  """Whole rated transcripts (rating in [0, 4]) from a red-team-attempts file."""
  out = []
  for r in sources.red_team_attempts(path):
    if r["rating"] < 0:
      continue  # unrated attempt
    if not 0.0 <= r["rating"] <= 4.0:
      raise InputError(f"{path}: {r['id']}: rating {r['rating']} outside 0-4; fix the entry")
    msgs = text_lib.parse_transcript(r["transcript"], f"{path}: {r['id']}")
    out.append(Rated([{"role": m["role"], "content": m["content"].strip()} for m in msgs],
                     r["rating"]))
  if not out:
    raise InputError(f"{path}: no rated transcripts (field 'rating' 0-4); "
                     "give the red-team-attempts file")
  return out


def encode(tokenizer, conversations, fmt: str, max_len: int):
  """Left-padded tokens_BxL / mask_BxL of whole conversations (end kept if too long)."""
  from cai_jax.text.conversation import ConversationEncoder
  enc = ConversationEncoder(tokenizer, fmt)
  rows = []
  for msgs in conversations:
    # Read where the PM reads: the end of the assistant's last turn.
    if msgs and msgs[-1]["role"] == "assistant":
      ids = list(enc.conversation(msgs[:-1], msgs[-1]["content"], max_len=max_len).ids)
    else:
      ids = enc.prompt_ids(msgs)[-max_len:]
    rows.append(ids or [tokenizer.eos_token_id or 0])
  return left_pad(rows, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)


def l2_loss(pred_B, rating_B, weight_B=None):
  """Mean squared error between predicted and rated harmfulness."""
  err = (pred_B.astype(jnp.float32) - rating_B.astype(jnp.float32)) ** 2
  if weight_B is None:
    return jnp.mean(err)
  return jnp.sum(err * weight_B) / jnp.maximum(jnp.sum(weight_B), 1.0)


def _padded(tokens, mask, length):
  extra = length - tokens.shape[1]
  if extra <= 0:
    return tokens, mask
  return (np.pad(tokens, ((0, 0), (extra, 0))), np.pad(mask, ((0, 0), (extra, 0))))


def train(cfg, params, tokenizer, data: list[Rated], *, steps: int, batch_size: int = 8,
          learning_rate: float = 5e-5, weight_decay: float = 0.0, max_len: int = 512,
          fmt: str = "chat", seed: int = 0, progress: bool = True,
          directory: Optional[str] = None, mesh=None):
  """Fits the scalar head (and trunk) to the ratings with the supervised runner
  (`training.fit`: checkpoints and metrics.jsonl in `directory`, a temporary one by
  default); returns (params, loss per step)."""
  import tempfile
  from cai_jax import sharding
  from cai_jax.training import data as data_lib
  from cai_jax.training import fit, optim
  if "score_kernel" not in params:
    params = models.add_score_head(cfg, params)
    # Start at the mean rating so early steps learn the ordering, not the offset.
    params["score_bias"] = jnp.asarray(np.mean([d.rating for d in data]), params["score_bias"].dtype)
  if len(data) < batch_size:
    raise InputError(f"harmfulness: {len(data)} rated transcripts cannot fill one batch of "
                     f"{batch_size}; give more ratings or lower the batch size")
  tokens, mask = encode(tokenizer, [d.messages for d in data], fmt, max_len)
  # One padded length for every batch: one compiled step.
  tokens, mask = _padded(tokens, mask, bucket_length(tokens.shape[1]))
  ratings = np.array([d.rating for d in data], np.float32)
  make = lambda idx: {"tokens_BxL": tokens[idx], "mask_BxL": mask[idx],  # noqa: E731
                      "rating_B": ratings[idx]}
  batches = data_lib.BatchIterator(data_lib.ShuffledIndex(len(data), batch_size, seed), make)

  def loss_for(c, split):
    return lambda p, batch, rng: (
        l2_loss(models.reward(c, p, batch["tokens_BxL"], batch["mask_BxL"]), batch["rating_B"]),
        {})

  oc = optim.default_optim_config()
  oc.update(learning_rate=learning_rate, weight_decay=weight_decay, b2=0.999,
            warmup_steps=max(1, steps // 10))
  mesh = mesh if mesh is not None else sharding.make_mesh((1, 1, 1),
                                                          devices=jax.local_devices()[:1])
  with tempfile.TemporaryDirectory() as tmp:
    res = fit.fit("harmfulness", cfg=cfg, params=params, tokenizer=tokenizer, batches=batches,
                  example_batch=make(np.arange(batch_size)), loss_for=loss_for, num_steps=steps,
                  optim_config=oc, mesh=mesh, rules=sharding.DEFAULT_RULES,
                  directory=directory or tmp, every=max(steps, 1), keep=1, async_save=False,
                  progress=progress, seed=seed)
  return jax.tree_util.tree_map(jnp.asarray, res.state.params), [h["loss"] for h in res.history]


def predict(cfg, params, tokenizer, conversations, *, fmt: str = "chat", max_len: int = 512,
            batch_size: int = 16) -> np.ndarray:
  """Predicted 0-4 harmfulness of each conversation (unclipped regression output)."""
  out = []
  for s in range(0, len(conversations), batch_size):
    tokens, mask = encode(tokenizer, conversations[s:s + batch_size], fmt, max_len)
    tokens, mask = _padded(tokens, mask, bucket_length(tokens.shape[1]))
    out.append(np.asarray(models.reward(cfg, params, tokens, mask)))
  return np.concatenate(out) if out else np.zeros((0,), np.float32)


def split(data: list[Rated], eval_fraction: float, seed: int = 0):
  rng = np.random.default_rng(seed)
  perm = rng.permutation(len(data))
  n_eval = int(round(eval_fraction * len(data)))
  return [data[i] for i in perm[n_eval:]], [data[i] for i in perm[:n_eval]]


def main(argv=None) -> int:
  import argparse
  import json
  ap = argparse.ArgumentParser(description="Train the 0-4 harmfulness model.")
  ap.add_argument("--model", required=True)
  ap.add_argument("--data", required=True)
  ap.add_argument("--out", default="")
  ap.add_argument("--steps", type=int, default=200)
  ap.add_argument("--fmt", default="chat")
  args = ap.parse_args(argv)
  from cai_jax import roles
  try:
    cfg, params, tok = roles.load(args.model)
    data = load_ratings(args.data)
  except InputError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  train_set, eval_set = split(data, 0.1)
  params, _ = train(cfg, params, tok, train_set, steps=args.steps, fmt=args.fmt)
  pred = predict(cfg, params, tok, [d.messages for d in eval_set], fmt=args.fmt)
  mse = float(np.mean((pred - np.array([d.rating for d in eval_set])) ** 2)) if len(pred) else float("nan")
  if args.out:
    models.save_pretrained(cfg, params, args.out, tokenizer=tok)
  print(json.dumps({"eval_mse": mse, "n_train": len(train_set), "n_eval": len(eval_set)}))
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""Chat with any model the project loads: `python -m cai_jax.chat --model smollm2`.

Prompts come from --prompt (repeatable) or, without it, one per line on stdin.
Useful for a first look at a checkpoint, e.g. `--model WORKDIR/ppo/final`.
"""
from __future__ import annotations

import sys

from absl import app, flags

flags.DEFINE_string("model", "smollm2", "'smollm2', 'tiny', an HF directory or a .gguf file")
flags.DEFINE_multi_string("prompt", None, "a user message (repeatable); default: read stdin")
flags.DEFINE_integer("max_new_tokens", 96, "tokens to sample per answer")
flags.DEFINE_float("temperature", 0.0, "0 for greedy decoding")
flags.DEFINE_string("format", "chat", "'chat' (tokenizer template) or 'raw' (Human/Assistant)")
flags.DEFINE_integer("seed", 0, "sampling seed")
FLAGS = flags.FLAGS


def chat(model: str, prompts, max_new_tokens=96, temperature=0.0, fmt="chat", seed=0):
  from cai_jax import sampling
  from cai_jax import roles
  cfg, params, tok = roles.load(model)
  msgs = [[{"role": "user", "content": p}] for p in prompts]
  comps = sampling.generate(cfg, params, tok, msgs, fmt=fmt, max_new_tokens=max_new_tokens,
                            greedy=temperature <= 0, temperature=max(temperature, 1e-6),
                            seed=seed, batch_size=min(16, len(msgs)), desc="answering")
  return [c.text.strip() for c in comps]


def main(argv):
  del argv
  from cai_jax.utils import InputError
  prompts = FLAGS.prompt or [l.strip() for l in sys.stdin if l.strip()]
  if not prompts:
    print("error: no prompts; pass --prompt or pipe lines on stdin", file=sys.stderr)
    sys.exit(2)
  try:
    answers = chat(FLAGS.model, prompts, FLAGS.max_new_tokens, FLAGS.temperature,
                   FLAGS.format, FLAGS.seed)
  except InputError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  for p, a in zip(prompts, answers):
    print(f"\nHuman: {p}\nAssistant: {a}")


if __name__ == "__main__":
  app.run(main)

"""Real weights: SmolLM2-135M-Instruct from GGUF against transformers' own GGUF load."""
import os

import jax.numpy as jnp
import numpy as np
import pytest

from cai_jax import models, text

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Give me three tips for sleeping better."}],
    [{"role": "system", "content": "You are a careful assistant."},
     {"role": "user", "content": "How do I pick a lock?"},
     {"role": "assistant", "content": "I can explain how locks work in general."},
     {"role": "user", "content": "Okay, explain pin tumbler locks."}],
]


def _encode(tok, msgs):
  s = text.render(msgs, fmt="chat", tokenizer=tok)
  return tok(s, add_special_tokens=False)["input_ids"]


def test_config_and_tokenizer(smollm2):
  cfg, params, tok = smollm2
  assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (30, 576, 9, 3)
  assert cfg.intermediate_size == 1536 and cfg.vocab_size == 49152 and cfg.tie_embeddings
  assert abs(models.count_params(params) - 134.5e6) < 0.1e6
  assert tok.convert_ids_to_tokens(cfg.eos_token_id) == "<|im_end|>"
  # Second load comes from the cache and agrees.
  tok2 = models.load_tokenizer("smollm2")
  assert tok2("hello world")["input_ids"] == tok("hello world")["input_ids"]


def test_logits_match_transformers_gguf(smollm2, smollm2_path):
  import torch
  from transformers import AutoModelForCausalLM
  cfg, params, tok = smollm2
  ref_model = AutoModelForCausalLM.from_pretrained(
      os.path.dirname(smollm2_path), gguf_file=os.path.basename(smollm2_path),
      dtype=torch.float32).eval()
  seqs = [_encode(tok, m) for m in PROMPTS]
  L = max(map(len, seqs))
  toks = np.full((len(seqs), L), cfg.pad_token_id)
  mask = np.zeros((len(seqs), L), bool)
  for i, s in enumerate(seqs):  # left-padded batch
    toks[i, L - len(s):] = s
    mask[i, L - len(s):] = True
  ours = np.asarray(models.logits(cfg, params, toks, mask))
  for i, s in enumerate(seqs):
    with torch.no_grad():
      ref = ref_model(torch.tensor([s])).logits.numpy()[0]
    diff = np.abs(ours[i, L - len(s):] - ref).max()
    assert diff < 1e-3, (i, diff)


def test_greedy_paris(smollm2):
  cfg, params, tok = smollm2
  seq = _encode(tok, PROMPTS[0])
  n0 = len(seq)
  for _ in range(10):
    lg = models.logits(cfg, params, jnp.asarray([seq]))
    nxt = int(jnp.argmax(lg[0, -1]))
    seq.append(nxt)
    if nxt == cfg.eos_token_id:
      break
  answer = tok.decode(seq[n0:])
  assert "Paris" in answer, answer

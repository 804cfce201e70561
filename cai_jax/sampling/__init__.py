"""Jitted KV-cache sampling and scoring for every stage (revise, label, PPO, evaluate).

  out = sampling.sample(cfg, params, tokens_BxP, mask_BxP, rng, max_new_tokens=64)
  comps = sampling.generate(cfg, params, tokenizer, prompts, fmt="chat")
  lps = sampling.score(cfg, params, tokenizer, prompts, continuations)
  lps = sampling.score_tokens(cfg, params, prompt_ids, cont_ids)
"""
from cai_jax.sampling.api import (Completion, choose_buckets, combine_axes, completion_text,
                                  encode_prompt, eos_ids_of, generate, generation_mesh,
                                  group_by_shape, left_pad, pm_scores, scalar_scores, score,
                                  score_tokens)
from cai_jax.sampling.sampler import (TRACE_COUNTS, PromptTooLongError, SampleOutput,
                                      bucket_length, compile_count, key_seed, sample, shared_prefix_len)
from cai_jax.sampling.stops import StopMatcher, from_strings, from_token_seqs, trim_at_stop

"""One decoder Transformer in five roles, with HF and GGUF checkpoint I/O.

Public API:
  cfg, params = models.load_pretrained(path)            # HF dir or .gguf file
  logits_BxLxV = models.logits(cfg, params, tokens_BxL, mask_BxL)   # float32
  models.save_pretrained(cfg, params, out_dir)           # HF format
  models.save_peft_adapter(cfg, params, out_dir, base)   # LoRA adapters, PEFT layout
  tok = models.load_tokenizer(path)                      # HF tokenizer object
"""
from cai_jax.models.config import (ModelConfig, ModelConfigError, PRESETS, gemma_7b,
                                   llama2_7b, llama3_8b, smollm2_135m, tiny)
from cai_jax.models.core import (abstract_params, add_score_head, cache_logical_axes,
                                 cast_params, count_params, drop_heads, forward, frozen_copy,
                                 heads_of,
                                 init_cache, init_params, last_token_index, lm_head_weight,
                                 logits, module, positions_from_mask, reward, scores,
                                 stack_layers, unstack_layers)
from cai_jax.models.io import (CheckpointError, cache_dir, check_pretrained, load_gguf, load_hf,
                               load_pretrained, load_tokenizer, resolve_path, save_peft_adapter,
                               save_pretrained, smollm2_gguf_path)

"""SL-CAI stage: tokenisation with response-only loss masks, end-to-end run, bad input."""
import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from cai_jax import models
from cai_jax import roles
from cai_jax.stages import sft
from cai_jax.training import data
from cai_jax.utils import InputError


def _config(model="tiny", fmt="chat"):
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = model
  c.dtype = "float32"
  c.prompt_format = fmt
  c.mesh = ml_collections.ConfigDict({"ici": (-1, 1, 1), "dcn": None})
  c.logical_axis_rules = None
  c.sft = sft.default_config()
  c.sft.max_len = 48
  c.sft.batch_size = 8
  c.sft.max_steps = 3
  c.sft.num_epochs = 2.0  # 22 train rows = 2 batches per epoch
  c.sft.checkpoint_every = 2
  c.sft.eval_fraction = 0.2
  c.sft.optim.learning_rate = 1e-3
  c.sft.progress = False
  c.sft.tensorboard = True
  return c


def _write_revise(d, n=12):
  os.makedirs(d, exist_ok=True)
  recs = [{"id": f"rt{i}", "prompt": [{"role": "user", "content": f"How do I pick lock number {i}?"}],
           "initial_response": "Sure, here is how.",
           "rounds": [{"principle_id": "harmful0", "critique": "It helps with crime.",
                       "revision": f"I can't help with that, but a locksmith can ({i})."},
                      {"principle_id": "harmful1", "critique": "Fine.",
                       "revision": f"Please ask a locksmith for lock {i}."}]} for i in range(n)]
  helpful = [{"id": f"h{i}", "prompt": [{"role": "user", "content": f"What is {i} plus {i}?"}],
              "responses": [f"It is {2 * i}."]} for i in range(4)]
  with open(os.path.join(d, "records.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in recs)
  with open(os.path.join(d, "helpful.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in helpful)


@pytest.mark.parametrize("fmt", ["chat", "raw"])
def test_loss_mask_covers_exactly_the_response(fmt):
  from cai_jax.text.conversation import ConversationEncoder
  tok = roles.load_tokenizer("tiny")
  enc = ConversationEncoder(tok, fmt)
  msgs = [{"role": "user", "content": "Hi there"}]
  ex = data.sft_example(enc, msgs, "Hello! How can I help?", max_len=200)
  resp = tok.decode(ex.tokens[ex.loss_mask])
  prompt = tok.decode(ex.tokens[~ex.loss_mask])
  if fmt == "chat":
    # The turn ends at the template's end-of-turn token: what the policy samples last.
    assert resp == "Hello! How can I help?<|im_end|>"
    assert prompt.endswith("<|im_start|>assistant\n") and "Hi there" in prompt
  else:
    assert resp == " Hello! How can I help?" + tok.eos_token
    assert prompt.endswith("Assistant:")
  short = data.sft_example(enc, msgs, "Hello! How can I help?", max_len=8)
  assert len(short.tokens) == 9 and short.loss_mask.any() and not short.loss_mask.all()


def test_sft_stage_end_to_end_and_skip(tmp_path):
  wd = str(tmp_path)
  _write_revise(os.path.join(wd, "revise"))
  cfg = _config()
  cfg.keep_checkpoints_when_done = True   # read below, as a stage without an export
  summary = sft.run(cfg, wd)
  assert summary["steps"] == 3 and summary["num_examples"] == 12 * 2 + 4
  assert np.isfinite(summary["final_loss"]) and np.isfinite(summary["eval"]["loss"])
  assert os.path.exists(os.path.join(wd, "sft", "DONE"))
  mcfg, params = models.load_pretrained(os.path.join(wd, "sft", "final"))
  assert mcfg.hidden_size == 64 and "embedding" in params
  # transformers' generate stops where the stages' sampler does.
  from transformers import GenerationConfig
  tok = roles.load_tokenizer("tiny")
  gen = GenerationConfig.from_pretrained(os.path.join(wd, "sft", "final"))
  stops = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
  assert tok.eos_token_id in stops and gen.pad_token_id is not None
  assert os.listdir(os.path.join(wd, "sft", "tb"))
  # One metrics line per step: loss, learning rate and throughput, for the report's curves.
  lines = [json.loads(x) for x in open(os.path.join(wd, "sft", "metrics.jsonl"))]
  assert [x["step"] for x in lines if "loss" in x] == [1, 2, 3]
  for x in lines:
    if "loss" in x:
      assert {"learning_rate", "tokens_per_s", "grad_norm"} <= set(x)
  assert any("eval/loss" in x for x in lines)
  assert sft.run(cfg, wd) == json.loads(open(os.path.join(wd, "sft", "DONE")).read())
  # A later run can start from this stage's directory (its final/ export).
  c2, p2, _ = roles.load(os.path.join(wd, "sft"))
  np.testing.assert_array_equal(np.asarray(p2["embedding"]), np.asarray(params["embedding"]))
  # ... or from its checkpoints when it has no export.
  c3, p3, _ = roles.load(os.path.join(wd, "sft", "checkpoints"))
  np.testing.assert_array_equal(np.asarray(p3["embedding"]), np.asarray(params["embedding"]))


def test_sft_missing_revise_output_is_input_error(tmp_path):
  with pytest.raises(InputError, match=r"revise/records.jsonl: revise records not found; run the revise"):
    sft.run(_config(), str(tmp_path))


def test_sft_resume_with_other_model_shape_is_input_error(tmp_path):
  wd = str(tmp_path / "w")
  _write_revise(os.path.join(wd, "revise"))
  cfg = _config()
  cfg.sft.max_steps = 2
  cfg.keep_checkpoints_when_done = True  # a stage stopped before DONE keeps them
  sft.run(cfg, wd)
  os.remove(os.path.join(wd, "sft", "DONE"))
  other = roles.tiny_config(hidden_size=48, head_dim=12)
  hf = str(tmp_path / "other")
  models.save_pretrained(other, models.init_params(other, jax.random.PRNGKey(0)), hf,
                         tokenizer=roles.load_tokenizer("tiny"))
  cfg2 = _config(model=hf)
  cfg2.sft.max_steps = 4
  # The settings snapshot refuses the changed model first (a long path is cut short in the
  # message, so the match stops at the arrow) ...
  with pytest.raises(InputError, match=r"other settings \(model: tiny -> /") as e:
    sft.run(cfg2, wd)
  # ... and without it the restore's own shape check does.
  os.remove(os.path.join(wd, "sft", "settings.json"))
  with pytest.raises(InputError, match="another model shape") as e:
    sft.run(cfg2, wd)
  assert "\n" not in str(e.value)


def test_sft_missing_init_from_is_input_error(tmp_path):
  wd = str(tmp_path)
  _write_revise(os.path.join(wd, "revise"))
  cfg = _config()
  cfg.sft.init_from = str(tmp_path / "no_such_model")
  with pytest.raises(InputError, match="no_such_model: not found"):
    sft.run(cfg, wd)
  cfg.sft.init_from = os.path.join(wd, "revise")  # a directory that is no model
  with pytest.raises(InputError, match="neither an HF checkpoint"):
    sft.run(cfg, wd)


def test_finished_stage_drops_its_checkpoints_unless_asked_to_keep_them(tmp_path):
  for keep in (False, True):
    wd = str(tmp_path / str(keep))
    _write_revise(os.path.join(wd, "revise"))
    cfg = _config()
    cfg.keep_checkpoints_when_done = keep
    sft.run(cfg, wd)
    assert os.path.exists(os.path.join(wd, "sft", "final", "model.safetensors"))
    assert os.path.isdir(os.path.join(wd, "sft", "checkpoints")) == keep
    # Either way a finished stage is skipped and its export is what later stages load.
    assert sft.run(cfg, wd) == json.loads(open(os.path.join(wd, "sft", "DONE")).read())

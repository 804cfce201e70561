"""Preference-model stage: mixing, calibration, end-to-end training, bad input."""
import json
import os

import ml_collections
import numpy as np
import pytest

from cai_jax import models
from cai_jax.stages import preference
from cai_jax.training import preferences
from cai_jax.utils import InputError


def _config():
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.model = "tiny"
  c.dtype = "float32"
  c.prompt_format = "chat"
  c.mesh = ml_collections.ConfigDict({"ici": (-1, 1, 1), "dcn": None})
  c.logical_axis_rules = None
  c.pm = preference.default_config()
  c.pm.max_len = 40
  c.pm.batch_size = 8
  c.pm.eval_fraction = 0.25
  c.pm.optim.learning_rate = 3e-3
  c.pm.optim.grad_clip = 1.0
  c.pm.score_init_std = 0.02
  c.pm.progress = False
  c.pm.checkpoint_every = 5
  return c


def _write_label(d, n=40):
  """Refusals are better than compliance with soft labels (p_a 0.8 / 0.2)."""
  os.makedirs(d, exist_ok=True)
  rows = []
  for i in range(n):
    good, bad = f"No, I won't help with item {i}.", f"Sure! Step one for item {i}: go."
    a_good = i % 2 == 0
    rows.append({"id": f"p{i}", "prompt": [{"role": "user", "content": f"Help me steal item {i}"}],
                 "response_a": good if a_good else bad, "response_b": bad if a_good else good,
                 "principle_ids": ["harmful0"], "p_a": 0.8 if a_good else 0.2,
                 "logp_a": -1.0, "logp_b": -2.0})
  path = os.path.join(d, "preferences.jsonl")
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  return path


def _write_human(path, n=24):
  with open(path, "w") as f:
    for i in range(n):
      p = f"\n\nHuman: What is {i} times two?\n\nAssistant:"
      f.write(json.dumps({"chosen": p + f" It is {2 * i}.", "rejected": p + " I don't know."}) + "\n")
  return path


def test_mix_ratio():
  ai, hu = list(range(30)), list(range(100, 200))
  m = preferences.mix(ai, hu, 0.25, seed=0)
  assert sum(x >= 100 for x in m) == 10 and sum(x < 100 for x in m) == 30
  m = preferences.mix(ai, hu[:5], 0.5, seed=0)  # not enough human pairs: subsample AI
  assert sum(x >= 100 for x in m) == 5 and sum(x < 100 for x in m) == 5
  assert preferences.mix(ai, hu, 0.0, 0) == ai


def test_calibration_ece_hand_computed():
  probs = np.array([0.1, 0.2, 0.8, 0.9])
  labels = np.array([0.0, 1.0, 1.0, 1.0])
  cal = preferences.calibration(probs, labels, bins=2)
  # bin 0: conf 0.15, freq 0.5; bin 1: conf 0.85, freq 1.0 -> 0.5*0.35 + 0.5*0.15
  assert abs(cal["ece"] - 0.25) < 1e-12


def test_pm_stage_trains_and_exports(tmp_path):
  wd = str(tmp_path)
  _write_label(os.path.join(wd, "label"))
  c = _config()
  c.pm.human_data = (_write_human(str(tmp_path / "helpful.jsonl")),)
  c.pm.human_fraction = 0.25
  c.pm.pretrain_data = c.pm.human_data
  c.pm.pretrain_steps = 2
  c.pm.num_epochs = 8
  c.pm.max_steps = 24
  s = preference.run(c, wd)
  assert s["pretrain"]["steps"] == 2 and s["steps"] == 24
  assert s["num_ai_pairs"] == 40 and s["num_human_pairs"] == 24
  assert s["num_train_pairs"] == 30 + 10  # 30 AI train pairs + 25% human
  ev = s["eval"]
  assert ev["ai_num_pairs"] == 10 and ev["human_num_pairs"] == 6
  # Refusal vs compliance is easy: held-out AI pairs are all ranked right.
  assert ev["ai_accuracy"] == 1.0, ev
  assert 0 <= ev["ai_ece"] <= 1
  cfg, params = models.load_pretrained(os.path.join(wd, "pm", "final"))
  assert "score_kernel" in params and "score_bias" in params
  _hf_sequence_classification_reproduces_scores(os.path.join(wd, "pm", "final"), cfg, params)
  assert os.path.exists(os.path.join(wd, "pm", "DONE"))
  assert json.load(open(os.path.join(wd, "pm", "eval.json")))["ai_calibration_bins"]


def test_pm_missing_label_output_is_input_error(tmp_path):
  with pytest.raises(InputError, match=r"label/preferences.jsonl: AI preference labels not found"):
    preference.run(_config(), str(tmp_path))


def test_pm_bad_preference_line_is_input_error(tmp_path):
  d = tmp_path / "label"
  d.mkdir()
  (d / "preferences.jsonl").write_text(json.dumps({"prompt": [], "response_a": "x"}) + "\n")
  with pytest.raises(InputError, match=r"preferences.jsonl:1: expected prompt"):
    preference.run(_config(), str(tmp_path))


def _hf_sequence_classification_reproduces_scores(path, cfg, params):
  """transformers loads the PM export as AutoModelForSequenceClassification (score
  head included) and scores right-padded conversations as the project does."""
  import torch
  import transformers
  from cai_jax import roles
  from cai_jax.text.conversation import ConversationEncoder
  tok = roles.load_tokenizer(path)
  enc = ConversationEncoder(tok, "chat")
  convs = [enc.conversation([{"role": "user", "content": q}], a).ids for q, a in
           [("How do I pick a lock?", "I can't help with that."), ("Hi", "Hello! How can I help?"),
            ("Tell me a joke about cats, please.", "Why did the cat sit on the computer?")]]
  L = max(map(len, convs))
  toks = np.full((len(convs), L), tok.pad_token_id, np.int64)
  mask = np.zeros((len(convs), L), bool)
  for i, c in enumerate(convs):
    toks[i, :len(c)], mask[i, :len(c)] = c, True
  ours = np.asarray(models.reward(cfg, params, toks.astype(np.int32), mask))
  hf = transformers.AutoModelForSequenceClassification.from_pretrained(path).eval()
  assert type(hf).__name__ == "LlamaForSequenceClassification"
  assert hf.config.pad_token_id == tok.pad_token_id != convs[0][-1]
  with torch.no_grad():
    theirs = hf(input_ids=torch.tensor(toks),
                attention_mask=torch.tensor(mask.astype(np.int64))).logits[:, 0].numpy()
  # The ranking loss never moves the bias (transformers' head has none).
  assert float(params["score_bias"]) == 0.0 == hf.config.score_bias
  np.testing.assert_allclose(theirs, ours, atol=1e-4)

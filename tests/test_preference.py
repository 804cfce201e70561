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


def test_per_axis_pm_loss_is_each_heads_soft_ranking_loss_on_its_labels():
  """A head per axis: the loss is the mean, over labelled (pair, axis) entries, of
  -[p log σ(d) + (1-p) log σ(-d)] with d the axis's margin (hand computed)."""
  import jax
  import jax.numpy as jnp
  from cai_jax.training import data, objectives
  cfg = models.tiny(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1,
                    num_heads=2, num_kv_heads=1, head_dim=8, score_labels=("harm", "help"))
  params = models.add_score_head(cfg, models.init_params(cfg, jax.random.PRNGKey(0)),
                                 jax.random.PRNGKey(1), init_std=1.0)
  rng = np.random.default_rng(0)
  pairs = [data.PairExample(rng.integers(3, 64, 5 + i), rng.integers(3, 64, 4 + i), 0.5,
                            np.array([0.9, 0.3 + 0.1 * i], np.float32),
                            np.array([1.0, float(i % 2)], np.float32)) for i in range(4)]
  batch = data.pair_batch(pairs, 10, 0)
  loss, m = objectives.pm_loss_fn(cfg)(params, batch, None)
  ra = [np.asarray(models.reward(cfg, params, p.tokens_a[None], np.ones((1, len(p.tokens_a)), bool)))[0]
        for p in pairs]
  rb = [np.asarray(models.reward(cfg, params, p.tokens_b[None], np.ones((1, len(p.tokens_b)), bool)))[0]
        for p in pairs]
  terms, n = 0.0, 0.0
  for i, p in enumerate(pairs):
    for j in range(2):
      d = float(ra[i][j] - rb[i][j])
      ls = lambda x: -np.log1p(np.exp(-x))  # noqa: E731  (log σ)
      terms += p.w_axes[j] * -(p.p_axes[j] * ls(d) + (1 - p.p_axes[j]) * ls(-d))
      n += p.w_axes[j]
  assert float(loss) == pytest.approx(terms / n, rel=1e-5)
  assert float(m["labelled"]) == n == 6
  # The second axis's accuracy counts only its labelled pairs (1 and 3).
  want = np.mean([(ra[i][1] - rb[i][1] > 0) == (pairs[i].p_axes[1] > 0.5) for i in (1, 3)])
  assert float(m["accuracy_help"]) == pytest.approx(want)


def test_pm_stage_with_a_head_per_axis(tmp_path):
  """pm.per_axis_heads: one head per constitution axis, trained on per-axis AI labels
  (harm prefers the refusal, helpfulness the compliance) and, on the helpfulness
  axis, on human comparisons; each head learns its own axis and the export keeps
  the axis names."""
  from cai_jax import constitution
  wd = str(tmp_path)
  path = _write_label(os.path.join(wd, "label"))
  names = constitution.load("harmlessness").axis_names
  rows = [json.loads(x) for x in open(path)]
  for r in rows:
    p = r["p_a"]  # refusal-is-A probability under harm
    r["axes"] = {n: {"p_a": p if n != "helpfulness" else 1.0 - p, "principle_ids": []}
                 for n in names}
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  c = _config()
  c.constitution = "harmlessness"
  c.pm.per_axis_heads = True
  c.pm.human_data = (_write_human(str(tmp_path / "helpful.jsonl")),)
  c.pm.human_fraction = 0.25
  c.pm.num_epochs = 8
  c.pm.max_steps = 24
  s = preference.run(c, wd)
  assert s["axes"] == names
  ev = s["eval"]
  for n in ("harm", "ethics", "helpfulness"):
    assert ev[f"ai_accuracy_{n}"] == 1.0, ev
  assert ev["human_num_labels"] == ev["human_num_pairs"] == 6  # one axis each
  cfg, params = models.load_pretrained(os.path.join(wd, "pm", "final"))
  assert cfg.score_labels == tuple(names) and params["score_kernel"].shape[-1] == 3

  c2 = _config()
  c2.constitution = "harmlessness"
  c2.pm.per_axis_heads = True
  _write_label(os.path.join(wd, "plain", "label"))  # labels without axes
  with pytest.raises(InputError, match="label with --config.label.per_axis=True"):
    preference.run(c2, os.path.join(wd, "plain"))

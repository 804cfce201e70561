"""Multiple-choice evaluation: batched option scoring against full rows, position
debiasing, file formats, bad input, the PM formulation and the command line."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cai_jax import models, sampling
from cai_jax.text.conversation import ConversationEncoder
from cai_jax.evaluation import multiple_choice as mc
from cai_jax.evaluation import option_scores
from cai_jax import roles
from cai_jax.utils import InputError


def full_row_logprobs(cfg, params, prompt_ids, option_ids, pad_id: int = 0) -> list[np.ndarray]:
  """Reference: each prompt+option as its own row through `models.logits`."""
  res = []
  for p, opts in zip(prompt_ids, option_ids):
    L = max(len(p) + len(o) for o in opts)
    toks = np.full((len(opts), L), pad_id, np.int32)
    mask = np.zeros((len(opts), L), bool)
    for j, o in enumerate(opts):
      row = list(p) + list(o)
      toks[j, L - len(row):] = row
      mask[j, L - len(row):] = True
    lp = jax.nn.log_softmax(models.logits(cfg, params, jnp.asarray(toks), jnp.asarray(mask)),
                            axis=-1)
    lp = np.asarray(lp, np.float64)
    v = []
    for j, o in enumerate(opts):
      # Option token t sits at column L-len(o)+t and is predicted by the column before.
      cols = np.arange(L - len(o), L)
      v.append(float(sum(lp[j, c - 1, tok] for c, tok in zip(cols, o))))
    res.append(np.array(v))
  return res


@pytest.fixture(scope="module")
def tiny():
  cfg = roles.tiny_config()
  params = models.init_params(cfg, jax.random.PRNGKey(0), ("lm", "score"))
  params = models.add_score_head(cfg, params, jax.random.PRNGKey(1), init_std=0.5)
  return cfg, params, roles.load_tokenizer("tiny")


def _write_jsonl(path, recs):
  with open(path, "w") as f:
    for r in recs:
      f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
  return str(path)


def _lettered(i, n=3, correct=0):
  opts = [f"choice number {j} for item {i}" for j in range(n)]
  listed = "\n".join(f" ({mc.LETTERS[j]}) {o}" for j, o in enumerate(opts))
  prompt = f"Question {i}: which is right? Options:\n{listed}\nThe answer is:"
  letters = [f" ({mc.LETTERS[j]})" for j in range(n)]
  return {"prompt": prompt, "corrects": [letters[correct]],
          "incorrects": [x for j, x in enumerate(letters) if j != correct]}


def test_batched_option_scores_match_full_rows(tiny):
  cfg, params, _ = tiny
  rng = np.random.default_rng(0)
  lens = [5, 20, 33, 7, 130, 2]
  opt_lens = [[3, 3], [1, 4], [2, 2], [5, 1], [1, 1], [2, 6]]
  prompts = [list(rng.integers(3, 5000, n)) for n in lens]
  opts = [[list(rng.integers(3, 5000, m)) for m in ms] for ms in opt_lens]
  fast = option_scores.option_logprobs(cfg, params, prompts, opts, max_tokens=200)
  ref = full_row_logprobs(cfg, params, prompts, opts)
  for a, b in zip(fast, ref):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=0)


def test_transcript_rewards_match_model_reward(tiny):
  cfg, params, _ = tiny
  rows = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14]]
  got = sampling.scalar_scores(cfg, params, rows)
  for row, g in zip(rows, got):
    r = models.reward(cfg, params, np.array([row], np.int32), np.ones((1, len(row)), bool))
    assert g == pytest.approx(float(r[0]), abs=1e-5)


def test_combine_orders_cancels_pure_position_bias():
  content = np.array([0.3, -1.2, 2.0, 0.1])
  bias = np.array([5.0, -3.0, 0.7, 1.9])
  orders = mc.cyclic_orders(4)
  per_order = [np.array([content[k] + bias[j] for j, k in enumerate(o)]) for o in orders]
  lp = mc.combine_orders(per_order, orders)
  want = content - np.log(np.sum(np.exp(content)))
  got = lp - np.log(np.sum(np.exp(lp)))
  np.testing.assert_allclose(got, want, atol=1e-12)
  single = mc.combine_orders(per_order[:1], orders[:1])
  assert np.abs((single - np.log(np.sum(np.exp(single)))) - want).max() > 1.0


def test_debias_end_to_end_with_controlled_scores(tmp_path, tiny, monkeypatch):
  """Scores = content of the listed text + a bias per letter position: with
  --debias the probabilities equal softmax(content) exactly; without, they don't."""
  cfg, params, tok = tiny
  path = _write_jsonl(tmp_path / "e.jsonl", [_lettered(i, n=3, correct=i % 3) for i in range(4)])
  items = mc.load_items(path)
  content = {f"choice number {j} for item {i}": 0.5 * j - 0.3 * i
             for i in range(4) for j in range(3)}
  bias = np.array([3.0, -2.0, 0.25])

  def fake(cfg_, params_, prompt_ids, option_ids, **kw):
    out = []
    for ids in prompt_ids:
      text = tok.decode(ids)
      texts = [line.split(") ", 1)[1] for line in text.split("\n") if line.startswith(" (")]
      out.append(np.array([content[t] + bias[j] for j, t in enumerate(texts)]))
    if kw.get("progress"):
      kw["progress"](len(prompt_ids))
    return out

  monkeypatch.setattr(option_scores, "option_logprobs", fake)
  res = mc.evaluate(cfg, params, tok, items, debias=True, progress=False)
  for i, p in enumerate(res["probs"]):
    c = np.array([content[f"choice number {j} for item {i}"] for j in range(3)])
    np.testing.assert_allclose(p, np.exp(c) / np.exp(c).sum(), atol=1e-12)
  plain = mc.evaluate(cfg, params, tok, items, debias=False, progress=False)
  assert np.abs(plain["probs"][0] - res["probs"][0]).max() > 0.1


def test_debiased_probs_invariant_to_listed_order(tmp_path, tiny):
  """Real tiny model: listing the options in another order leaves debiased
  probabilities of each option's content unchanged (up to float error)."""
  cfg, params, tok = tiny
  rec = _lettered(0, n=3, correct=1)
  items_a = mc.load_items(_write_jsonl(tmp_path / "a.jsonl", [rec]))
  # Same question with options listed C, A, B (correct content now at letter C).
  texts = items_a[0].listed
  perm = [2, 0, 1]
  listed = "\n".join(f" ({mc.LETTERS[j]}) {texts[k]}" for j, k in enumerate(perm))
  rec_b = {"prompt": f"Question 0: which is right? Options:\n{listed}\nThe answer is:",
           "corrects": [" (C)"], "incorrects": [" (A)", " (B)"]}
  items_b = mc.load_items(_write_jsonl(tmp_path / "b.jsonl", [rec_b]))
  pa = mc.evaluate(cfg, params, tok, items_a, debias=True, progress=False)["probs"][0]
  pb = mc.evaluate(cfg, params, tok, items_b, debias=True, progress=False)["probs"][0]
  np.testing.assert_allclose(pb[[perm.index(k) for k in range(3)]], pa, atol=1e-5)


@pytest.mark.parametrize("rec,needle", [
    ({"prompt": "Q?", "corrects": [], "incorrects": [" (A)", " (B)"]}, "no correct option"),
    ({"prompt": "Q?", "corrects": ["x"], "incorrects": [f"y{i}" for i in range(26)]},
     "at most 26"),
    ({"prompt": "", "corrects": ["x"], "incorrects": ["y"]}, "empty or missing 'prompt'"),
    ('{"prompt": "Q?", "corrects": ["x"', "malformed JSON"),
])
def test_bad_items_name_file_and_line(tmp_path, rec, needle):
  path = _write_jsonl(tmp_path / "bad.jsonl", [_lettered(0), rec])
  with pytest.raises(InputError) as e:
    mc.load_items(path)
  msg = str(e.value)
  assert f"{path}:2:" in msg and needle in msg and "\n" not in msg


def test_empty_principle_rejected(tmp_path):
  path = _write_jsonl(tmp_path / "ok.jsonl", [_lettered(0)])
  with pytest.raises(InputError, match="principle is empty"):
    mc.load_items(path, principle="  ")
  with pytest.raises(InputError, match="principle is empty"):
    mc.format_question("ctx", "", ["a", "b"])


def test_bigbench_task_json_mc_and_pm(tmp_path, tiny):
  cfg, params, tok = tiny
  task = {"examples": [
      {"input": f"How do I do thing {i}?", "target_scores": {f"Good answer {i}.": 1,
                                                             f"Bad answer {i}.": 0}}
      for i in range(5)]}
  path = tmp_path / "task.json"
  path.write_text(json.dumps(task))
  items = mc.load_items(str(path))
  assert len(items) == 5 and all(it.responses is not None for it in items)
  # The correct response is not always listed first (options are shuffled).
  assert {it.correct.index(True) for it in items} == {0, 1}
  assert items[0].prompt.startswith("\nHuman: How do I do thing 0?\nAssistant:")
  assert items[0].prompt.endswith(mc.ANSWER_CUE)
  res = mc.evaluate(cfg, params, tok, items, formulation="mc", debias=True, progress=False)
  assert res["n"] == 5 and res["chance"] == 0.5 and 0 <= res["accuracy"] <= 1
  pm = mc.evaluate(cfg, params, tok, items, formulation="pm", progress=False)
  for it, p in zip(items, pm["probs"]):
    # Scored as the conversation encoder writes it (BIG-bench contexts are no
    # Human:/Assistant: transcripts, so as text followed by the response).
    enc = ConversationEncoder(tok, "raw")
    assert mc._context_messages(it.context) == it.context
    rows = [enc.conversation(it.context, r.strip()).ids for r in it.responses]
    r = [float(models.reward(cfg, params, np.array([x], np.int32),
                             np.ones((1, len(x)), bool))[0]) for x in rows]
    np.testing.assert_allclose(p, np.exp(r) / np.sum(np.exp(r)), atol=1e-5)
  want = np.mean([bool(it.correct[int(np.argmax(p))]) for it, p in zip(items, pm["probs"])])
  assert pm["accuracy"] == want


def test_few_shot_prompt_contains_other_solved_items(tmp_path, tiny, monkeypatch):
  cfg, params, tok = tiny
  path = _write_jsonl(tmp_path / "f.jsonl", [_lettered(i, n=2, correct=i % 2) for i in range(6)])
  items = mc.load_items(path)
  seen = []

  def fake(cfg_, params_, prompt_ids, option_ids, **kw):
    seen.extend(tok.decode(p) for p in prompt_ids)
    return [np.zeros(len(o)) for o in option_ids]

  monkeypatch.setattr(option_scores, "option_logprobs", fake)
  mc.evaluate(cfg, params, tok, items, few_shot=2, progress=False)
  for i, text in enumerate(seen):
    assert text.endswith(items[i].prompt)
    assert text.count("Question ") == 3 and f"Question {i}:" not in text[:-len(items[i].prompt)]
    assert text.count("The answer is: (") == 2  # the two solved shots


def test_cli_last_line_json_and_exit_2(tmp_path, capsys):
  path = _write_jsonl(tmp_path / "c.jsonl", [_lettered(i, n=2, correct=i % 2) for i in range(4)])
  assert mc.main(["--model", "tiny", "--data", path, "--no_progress",
                  "--calibration_png", str(tmp_path / "cal.png")]) == 0
  last = capsys.readouterr().out.strip().splitlines()[-1]
  out = json.loads(last)
  assert out["n"] == 4 and out["chance"] == 0.5 and 0 <= out["accuracy"] <= 1
  assert os.path.getsize(tmp_path / "cal.png") > 0
  bad = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "Q", "corrects": [],
                                              "incorrects": ["a", "b"]}])
  assert mc.main(["--model", "tiny", "--data", bad]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and f"{bad}:1:" in err


def test_paper_eval_files_parse(shared_data):
  d = os.path.join(shared_data, "cai_paper", "evals")
  hve = mc.load_items(os.path.join(d, "HarmfulVsEthical.jsonl"))
  hc = mc.load_items(os.path.join(d, "HarmfulnessClassification.jsonl"))
  assert len(hve) == 254 and len(hc) == 287
  assert all(it.listed is not None and len(it.options) == 2 for it in hve)
  assert all(it.listed is not None and len(it.options) == 9 for it in hc)
  assert np.mean([np.mean(it.correct) for it in hve]) == 0.5
  assert np.mean([np.mean(it.correct) for it in hc]) == pytest.approx(1 / 9)


@pytest.mark.slow
def test_smollm2_subset_scores_match_full_rows(shared_data, smollm2):
  """SmolLM2 on 3 HarmfulVsEthical items: batched scorer equals full rows."""
  cfg, params, tok = smollm2
  items = mc.load_items(os.path.join(shared_data, "cai_paper", "evals",
                                     "HarmfulVsEthical.jsonl"))[:3]
  prompts = [tok(it.prompt)["input_ids"] for it in items]
  opts = [[tok(o, add_special_tokens=False)["input_ids"] for o in it.options] for it in items]
  fast = option_scores.option_logprobs(cfg, params, prompts, opts)
  ref = full_row_logprobs(cfg, params, prompts, opts)
  for a, b in zip(fast, ref):
    np.testing.assert_allclose(a, b, atol=2e-3, rtol=0)
  res = mc.evaluate(cfg, params, tok, items, progress=False)
  assert res["n"] == 3
  assert res["accuracy"] == np.mean([it.correct[int(np.argmax(a))] for it, a in zip(items, fast)])


def test_subset_indices_score_as_in_full_run(tmp_path, tiny, monkeypatch):
  cfg, params, tok = tiny
  path = _write_jsonl(tmp_path / "s.jsonl", [_lettered(i, n=2, correct=i % 2) for i in range(6)])
  items = mc.load_items(path)
  seen = []

  def fake(cfg_, params_, prompt_ids, option_ids, **kw):
    seen.append([tok.decode(p) for p in prompt_ids])
    return [np.array([_hash(t), _hash(t + "b")]) for t in seen[-1]]

  def _hash(t):
    return (sum(map(ord, t)) % 97) / 10.0

  monkeypatch.setattr(option_scores, "option_logprobs", fake)
  full = mc.evaluate(cfg, params, tok, items, few_shot=1, debias=True, progress=False)
  sub = mc.evaluate(cfg, params, tok, items, few_shot=1, debias=True, progress=False,
                    indices=[4, 1])
  assert sub["n"] == 2
  np.testing.assert_allclose(sub["probs"][0], full["probs"][4], atol=0)
  np.testing.assert_allclose(sub["probs"][1], full["probs"][1], atol=0)
  assert seen[1] == seen[0][8:10] + seen[0][2:4]

"""Constitutions: the project's own files, validation errors, paper import and layout."""
import dataclasses
import json
import os

import pytest

from cai_jax import constitution as C
from cai_jax.data import sources


def test_project_constitutions_load():
  names = C.available()
  assert {"harmlessness", "good_for_humanity", "traits"} <= set(names)
  h = C.load("harmlessness")
  assert len(h.principles) >= 14 and len(h.choice_principles) >= 14
  assert len(h.critique_examples) >= 4 and len(h.label_examples) >= 4
  assert len(h.cot_examples) >= 4
  # Principles that steer away from preachy / over-reactive / accusatory answers.
  texts = " ".join(p.critique_request.lower() for p in h.principles)
  texts += " ".join(p.text.lower() for p in h.choice_principles)
  for word in ("preachy", "overreact", "accus"):
    assert word in texts
  g = C.load("good_for_humanity")
  assert len(g.principles) == 1 and len(g.choice_principles) == 1
  assert "humanity" in g.principles[0].critique_request
  t = C.load("traits")
  assert {"power", "self_preservation", "self_replication", "risk_seeking",
          "self_identity"} == set(t.principle_ids)
  for c in (h, g, t):
    assert len(set(c.principle_ids)) == len(c.principle_ids)
    for ex in c.label_examples + c.cot_examples:
      assert ex.conversation[-1]["role"] == "user" and 0 <= ex.answer < len(ex.options)
    for ex in c.critique_examples:
      assert ex.conversation[-1]["role"] == "assistant"


def test_load_by_path_and_roundtrip(tmp_path):
  h = C.load("harmlessness")
  p = tmp_path / "copy.json"
  h.save(str(p))
  again = C.load(str(p))
  assert again.principles == h.principles and again.cot_examples == h.cot_examples
  assert again.label_examples == h.label_examples


def test_subset_and_examples():
  h = C.load("harmlessness")
  s = h.subset(3)
  assert s.principle_ids == h.principle_ids[:3]
  assert len(s.choice_principles) == 3
  assert h.subset(-1) is h
  e = h.with_examples(num_critique=2, num_label=0)
  assert len(e.critique_examples) == 2 and not e.label_examples
  assert e.cot_examples == h.cot_examples
  assert h.principle("bias").id == "bias"
  with pytest.raises(KeyError):
    h.principle("nope")


def _write(tmp_path, data, name="c.json"):
  p = tmp_path / name
  p.write_text(json.dumps(data))
  return str(p)


def _minimal():
  return {"name": "t", "description": "",
          "principles": [{"id": "a", "critique_request": "Critique it.",
                          "revision_request": "Revise it."},
                         {"id": "b", "critique_request": "Critique B.",
                          "revision_request": "Revise B."}],
          "critique_examples": [{"conversation": [{"role": "user", "content": "q"},
                                                  {"role": "assistant", "content": "a"}],
                                 "critique_request": "c?", "critique": "c",
                                 "revision_request": "r?", "revision": "r"}],
          "label_examples": [{"conversation": [{"role": "user", "content": "q"}],
                              "principle": "", "options": ["x", "y"], "answer": 1}]}


def _one_line_error(path, *must_contain):
  with pytest.raises(C.ConstitutionError) as e:
    C.load(path)
  msg = str(e.value)
  assert "\n" not in msg
  assert path in msg
  for s in must_contain:
    assert s in msg, msg
  return msg


def test_bad_constitutions(tmp_path):
  C.load(_write(tmp_path, _minimal(), "ok.json"))

  d = _minimal()
  del d["principles"][1]["revision_request"]
  _one_line_error(_write(tmp_path, d, "missing.json"), "principles[1]", "revision_request")

  d = _minimal()
  d["principles"] = []
  _one_line_error(_write(tmp_path, d, "empty.json"), "principles", "empty")

  d = _minimal()
  d["critique_examples"][0]["conversation"][1]["role"] = "user"
  _one_line_error(_write(tmp_path, d, "fewshot.json"), "critique_examples[0].conversation[1]")

  d = _minimal()
  del d["critique_examples"][0]["critique"]
  _one_line_error(_write(tmp_path, d, "fewshot2.json"), "critique_examples[0]", "critique")

  d = _minimal()
  d["label_examples"][0]["answer"] = 2
  _one_line_error(_write(tmp_path, d, "answer.json"), "label_examples[0].answer")

  d = _minimal()
  d["principles"][1]["id"] = "a"
  _one_line_error(_write(tmp_path, d, "dup.json"), "principles[1].id", "duplicate")

  d = _minimal()
  d["principles"][0]["critique_request"] = "  "
  _one_line_error(_write(tmp_path, d, "blank.json"), "principles[0].critique_request")

  d = _minimal()
  d["principles"][0]["critque_request"] = "typo"
  _one_line_error(_write(tmp_path, d, "typo.json"), "principles[0]", "critque_request")

  p = tmp_path / "broken.json"
  p.write_text('{"name": "x",')
  _one_line_error(str(p), "malformed JSON")
  p = tmp_path / "latin1.json"
  p.write_bytes(b'{"name": "caf\xe9"}')
  _one_line_error(str(p), "UTF-8")
  with pytest.raises(C.ConstitutionError, match="no such constitution"):
    C.load("no_such_constitution_name")


def test_import_paper_counts(shared_data):
  d = os.path.join(shared_data, "cai_paper", "prompts")
  paper = C.load(d)  # a directory of the paper's files is imported
  assert (len(paper.principles), len(paper.choice_principles), len(paper.critique_examples),
          len(paper.label_examples), len(paper.cot_examples)) == (16, 16, 5, 5, 6)
  with open(os.path.join(d, "CritiqueRevisionInstructions.json"), encoding="utf-8") as f:
    raw = json.load(f)
  # The raw layout rebuilds the published request strings exactly.
  for p in paper.principles:
    msgs = [{"role": "user", "content": "q"}]
    crit = C.render_revision_prompt(
        C.revision_messages(msgs, "a", [], p, "critique"), "raw")
    assert crit.endswith(raw[p.id]["prompt"][0])
    rev = C.render_revision_prompt(
        C.revision_messages(msgs, "a", [], p, "direct_revision"), "raw")
    assert rev.endswith(raw[p.id]["edit_request"])
  for p in paper.choice_principles:
    assert not p.text.endswith("Options:") and p.text
  for ex in paper.critique_examples:
    assert ex.conversation[-1]["role"] == "assistant" and ex.revision
    assert "\n\nHuman:" not in ex.revision
  assert [e.answer for e in paper.label_examples] == [0, 1, 0, 1, 0]
  for e in paper.label_examples:
    assert e.conversation[-1]["role"] == "user"
  assert [e.answer for e in paper.cot_examples] == [1, 1, 0, 1, 0, 1]
  for e in paper.cot_examples:
    assert len(e.options) == 2 and e.reasoning and e.conversation[0]["role"] == "user"
    assert "So the answer is" not in e.reasoning


def _slmadison(shared_data):
  d = os.path.join(shared_data, "cai_paper", "samples")
  files = sorted(f for f in os.listdir(d) if f.endswith("_SLMADISON.jsonl"))
  assert len(files) == 2
  out = []
  for f in files:
    with open(os.path.join(d, f), encoding="utf-8") as fh:
      out += [json.loads(line) for line in fh if line.strip()]
  return out


def test_slmadison_critique_prompt_layout(shared_data):
  """Round k's critique prompt carries that round's principle right after the
  previous revision, in the paper's layout, for every round of every record."""
  paper = C.import_paper(os.path.join(shared_data, "cai_paper", "prompts"))
  records = _slmadison(shared_data)
  checked = 0
  for rec in records:
    from cai_jax import text as text_lib
    conv = sources.prompt_messages(text_lib.parse_transcript(rec["rl_prompt"]), "rl_prompt")
    init = rec["initial_response"][0]["sample"]
    rounds = []
    head = rec["rl_prompt"][:-len("\n\nAssistant:")]
    assert rec["rl_prompt"].endswith("\n\nAssistant:")
    # Paper text from the initial response on must be rebuilt character for
    # character; the red-team turns only up to stripped whitespace.
    expected = "\n\nAssistant: " + init.strip()
    for k, cst in enumerate(rec["cst"]):
      principle = paper.principle(cst["cst_key"])
      # The imported principle is the one the record was made with.
      assert cst["cst_value"]["prompt"][0] == \
          f"\n\nCritiqueRequest: {principle.critique_request}\n\nCritique:"
      prompt = C.render_revision_prompt(
          C.revision_messages(conv, init, rounds, principle, "critique"), "raw")
      assert prompt.endswith(expected + cst["cst_value"]["prompt"][0])
      rest = prompt[:-len(expected + cst["cst_value"]["prompt"][0])]
      assert rest.split() == head.split() and rest.startswith("\n\nHuman:")
      before = prompt[:-len(cst["cst_value"]["prompt"][0])]
      prev = rounds[-1]["revision"] if rounds else init
      assert before.endswith(" " + prev.strip())
      crit = cst["critique"]["sample"]
      rev_prompt = C.render_revision_prompt(
          C.revision_messages(conv, init, rounds, principle, "revision", critique=crit), "raw")
      assert rev_prompt.endswith(" " + crit.strip() + cst["cst_value"]["edit_request"])
      expected = (expected + cst["cst_value"]["prompt"][0] + " " + crit.strip()
                  + cst["cst_value"]["edit_request"] + " " + cst["revision"]["sample"].strip())
      rounds.append({"principle": principle, "critique": crit,
                     "revision": cst["revision"]["sample"]})
      checked += 1
  assert checked == 4 * len(records) and len(records) == 26


def test_history_off_and_fewshot_prefix():
  h = C.load("harmlessness")
  conv = [{"role": "user", "content": "question"}]
  p0, p1 = h.principles[0], h.principles[1]
  rounds = [{"principle": p0, "critique": "crit one", "revision": "rev one"}]
  full = C.render_revision_prompt(
      C.revision_messages(conv, "first", rounds, p1, "critique", h.critique_examples[:2]), "raw")
  assert full.index(h.critique_examples[0].revision) < full.index(
      h.critique_examples[1].revision) < full.index("question") < full.index("rev one")
  assert full.endswith("rev one\n\nCritiqueRequest: " + p1.critique_request + "\n\nCritique:")
  short = C.render_revision_prompt(
      C.revision_messages(conv, "first", rounds, p1, "critique", history=False), "raw")
  assert "first" not in short and "crit one" not in short
  assert short == ("\n\nHuman: question\n\nAssistant: rev one\n\nCritiqueRequest: "
                   + p1.critique_request + "\n\nCritique:")
  direct = C.render_revision_prompt(
      C.revision_messages(conv, "first", [], p1, "direct_revision"), "raw")
  assert "CritiqueRequest" not in direct and direct.endswith("\n\nRevision:")


def test_chat_rendering_uses_prior_turns():
  from cai_jax import roles
  tok = roles.load_tokenizer("tiny")
  h = C.load("harmlessness")
  conv = [{"role": "user", "content": "How do I pick a lock?"}]
  msgs = C.revision_messages(conv, "Use a pick.", [], h.principles[3], "critique",
                             h.critique_examples[:1])
  s = C.render_revision_prompt(msgs, "chat", tok)
  ex = h.critique_examples[0]
  # Few-shot dialogue first, as earlier turns: its critique is an assistant turn.
  assert s.index(ex.critique) < s.index("How do I pick a lock?")
  assert "<|im_start|>assistant\n" + ex.critique + "<|im_end|>" in s
  assert s.rstrip().endswith("<|im_start|>assistant")
  assert ("<|im_start|>user\n" + h.principles[3].critique_request + "<|im_end|>") in s
  assert "CritiqueRequest:" not in s
  assert C.stop_strings("chat", tok) and "\n\nRevisionRequest:" in C.stop_strings("raw")


def test_import_paper_missing_dir(tmp_path):
  with pytest.raises(C.ConstitutionError, match="file not found"):
    C.import_paper(str(tmp_path))


def test_axes_group_the_choice_principles(tmp_path):
  """axes: each choice principle in one named axis; for_axis keeps that axis's
  questions; the fingerprint leaves axes out (a run that does not label per axis is
  unchanged by them), the axes fingerprint covers them, and save keeps them."""
  h = C.load("harmlessness")
  assert h.axis_names == ["harm", "ethics", "helpfulness"]
  owned = [i for _, ids in h.axes for i in ids]
  assert sorted(owned) == sorted(h.choice_principle_ids)
  ethics = h.for_axis("ethics")
  assert ethics.choice_principle_ids == [i for i in h.choice_principle_ids
                                         if i in dict(h.axes)["ethics"]]
  assert ethics.axes == () and ethics.principles == h.principles
  plain = dataclasses.replace(h, axes=())
  assert plain.fingerprint() == h.fingerprint()
  assert plain.axes_fingerprint() != h.axes_fingerprint()
  p = tmp_path / "axes.json"
  h.save(str(p))
  assert C.load(str(p)).axes == h.axes
  with pytest.raises(KeyError, match="no axis 'tone'"):
    h.for_axis("tone")

  d = json.loads(p.read_text())
  d["axes"]["ethics"].append("less_harmful")
  _one_line_error(_write(tmp_path, d, "twice.json"), "axes.ethics", "already in axis 'harm'")
  d = json.loads(p.read_text())
  d["axes"]["ethics"].remove("wise")
  _one_line_error(_write(tmp_path, d, "missing_axis.json"), "axes", "'wise'", "in no axis")
  d = json.loads(p.read_text())
  d["axes"]["harm"].append("nope")
  _one_line_error(_write(tmp_path, d, "unknown.json"), "axes.harm", "'nope' is not a choice")
  d = json.loads(p.read_text())
  d["axes"] = {"bad name": d["axes"]["harm"]}
  _one_line_error(_write(tmp_path, d, "name.json"), "axes.bad name", "letters, digits")

"""Constitutions: principles, few-shot examples, loading, validation, paper import.

A constitution is the only human input about harmlessness in Constitutional AI.
It is a JSON file (format in `constitutions/README.md`) holding

- `principles`: critique/revision pairs used by SL-CAI (the revise stage);
- `choice_principles`: multiple-choice questions used by RL-CAI labelling;
- few-shot examples for critique/revision, for labelling and for
  chain-of-thought labelling.

`load("harmlessness")` reads `constitutions/harmlessness.json`; `load(path)`
reads any file; a directory holding the paper's published prompt files is
read by `import_paper` into the same objects.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Optional, Sequence

from cai_jax import text as text_lib
from cai_jax.utils import InputError

ROLES = ("user", "assistant")


class ConstitutionError(InputError):
  """A constitution file is malformed; the message names the file and entry."""


@dataclasses.dataclass(frozen=True)
class Principle:
  """One SL-CAI principle: a critique request and the matching revision request."""
  id: str
  critique_request: str
  revision_request: str


@dataclasses.dataclass(frozen=True)
class ChoicePrinciple:
  """One RL-CAI multiple-choice question, e.g. "Which response is less harmful?"."""
  id: str
  text: str


@dataclasses.dataclass(frozen=True)
class CritiqueExample:
  """A few-shot critique → revision demonstration.

  conversation: messages ending with the assistant reply being critiqued.
  """
  conversation: list
  critique_request: str
  critique: str
  revision_request: str
  revision: str


@dataclasses.dataclass(frozen=True)
class LabelExample:
  """A few-shot multiple-choice labelling demonstration.

  conversation: messages ending with the user turn the options answer.
  principle: the question shown with this example; "" means "show the
  question being asked", which is how the paper's examples are used.
  answer: index into options of the better response.
  """
  conversation: list
  principle: str
  options: tuple
  answer: int


@dataclasses.dataclass(frozen=True)
class CoTExample:
  """A few-shot chain-of-thought labelling demonstration (reasoning, then answer)."""
  conversation: list
  principle: str
  options: tuple
  reasoning: str
  answer: int


@dataclasses.dataclass(frozen=True)
class Constitution:
  name: str
  description: str
  principles: tuple
  choice_principles: tuple = ()
  critique_examples: tuple = ()
  label_examples: tuple = ()
  cot_examples: tuple = ()
  source: str = ""
  # Named groups of choice principles, ((axis, (choice principle id, ...)), ...): each
  # choice principle in exactly one. () is one unnamed axis, the paper's single scalar.
  axes: tuple = ()

  def subset(self, k: int) -> "Constitution":
    """The first k principles and first k choice principles (k <= 0: all).

    File order makes the restricted pool reproducible across runs; put the
    principles you want kept first.
    """
    if k is None or k <= 0:
      return self
    return dataclasses.replace(self, principles=self.principles[:k],
                               choice_principles=self.choice_principles[:k])

  def with_examples(self, num_critique: int = -1, num_label: int = -1,
                    num_cot: int = -1) -> "Constitution":
    """Keeps the first n few-shot examples of each kind (-1: all)."""
    cut = lambda xs, n: xs if n is None or n < 0 else xs[:n]
    return dataclasses.replace(
        self, critique_examples=cut(self.critique_examples, num_critique),
        label_examples=cut(self.label_examples, num_label),
        cot_examples=cut(self.cot_examples, num_cot))

  @property
  def axis_names(self) -> list[str]:
    return [name for name, _ in self.axes]

  def for_axis(self, name: str) -> "Constitution":
    """The constitution whose choice principles are one axis's (for labelling it)."""
    ids = dict(self.axes).get(name)
    if ids is None:
      raise KeyError(f"constitution {self.name!r} has no axis {name!r} "
                     f"(axes: {', '.join(self.axis_names) or 'none'})")
    return dataclasses.replace(self, choice_principles=tuple(
        p for p in self.choice_principles if p.id in ids), axes=())

  def axes_fingerprint(self) -> str:
    """A short hash of the axes alone. `fingerprint` leaves them out, so adding axes
    to a constitution changes nothing for a stage that does not label per axis."""
    import hashlib
    import json
    text = json.dumps([[n, list(ids)] for n, ids in self.axes])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

  @property
  def principle_ids(self) -> list[str]:
    return [p.id for p in self.principles]

  @property
  def choice_principle_ids(self) -> list[str]:
    return [p.id for p in self.choice_principles]

  def principle(self, pid: str) -> Principle:
    for p in self.principles:
      if p.id == pid:
        return p
    raise KeyError(f"constitution {self.name!r} has no principle {pid!r}")

  def choice_principle(self, pid: str) -> ChoicePrinciple:
    for p in self.choice_principles:
      if p.id == pid:
        return p
    raise KeyError(f"constitution {self.name!r} has no choice principle {pid!r}")

  def fingerprint(self) -> str:
    """A short hash of the whole content: what a settings snapshot records."""
    import hashlib
    import json
    text = json.dumps(self.to_dict(), sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

  def to_dict(self, with_axes: bool = False) -> dict:
    """The JSON form (`save`); axes only with `with_axes` (see `axes_fingerprint`)."""
    d = dataclasses.asdict(self)
    d.pop("source")
    axes = d.pop("axes")
    if with_axes and axes:
      d["axes"] = {name: list(ids) for name, ids in axes}
    for key in ("label_examples", "cot_examples"):
      for ex in d[key]:
        ex["options"] = list(ex["options"])
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}

  def save(self, path: str) -> None:
    from cai_jax.utils import atomic_write_text
    atomic_write_text(path, json.dumps(self.to_dict(with_axes=True), indent=2,
                                       ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------
# Loading and validation.

def constitutions_dir() -> str:
  """`constitutions/` at the project root (overridable by CAI_JAX_CONSTITUTIONS)."""
  env = os.environ.get("CAI_JAX_CONSTITUTIONS")
  if env:
    return env
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return os.path.join(root, "constitutions")


def available() -> list[str]:
  d = constitutions_dir()
  if not os.path.isdir(d):
    return []
  return sorted(f[:-5] for f in os.listdir(d) if f.endswith(".json"))


def resolve(name_or_path: str) -> str:
  if os.path.exists(name_or_path):
    return name_or_path
  cand = os.path.join(constitutions_dir(), name_or_path + ".json")
  if os.path.exists(cand):
    return cand
  raise ConstitutionError(
      f"{name_or_path}: no such constitution file or name; use a path or one of "
      f"{available()}")


def load(name_or_path) -> Constitution:
  """A Constitution from a name ("harmlessness"), a JSON path, a directory of
  the paper's prompt files, or a Constitution (returned as is)."""
  if isinstance(name_or_path, Constitution):
    return name_or_path
  path = resolve(str(name_or_path))
  if os.path.isdir(path):
    return import_paper(path)
  try:
    with open(path, "rb") as f:
      raw = f.read().decode("utf-8")
  except UnicodeDecodeError as e:
    raise ConstitutionError(
        f"{path}: not valid UTF-8 (byte {e.start}); re-encode as UTF-8") from None
  try:
    data = json.loads(raw)
  except json.JSONDecodeError as e:
    raise ConstitutionError(f"{path}: malformed JSON at line {e.lineno} column {e.colno} "
                            f"({e.msg}); fix the file") from None
  return from_dict(data, source=path)


class _Checker:
  """Field access that raises a one-line ConstitutionError naming file and entry."""

  def __init__(self, source: str):
    self.source = source

  def fail(self, where: str, msg: str):
    raise ConstitutionError(f"{self.source}: {where}: {msg} (format: constitutions/README.md)")

  def obj(self, x, where) -> dict:
    if not isinstance(x, dict):
      self.fail(where, f"expected an object, got {type(x).__name__}")
    return x

  def field(self, d: dict, key: str, where: str, kind=str, allow_empty=False):
    if key not in d:
      self.fail(where, f"missing field {key!r}")
    v = d[key]
    if kind is str:
      if not isinstance(v, str):
        self.fail(f"{where}.{key}", f"expected a string, got {type(v).__name__}")
      if not allow_empty and not v.strip():
        self.fail(f"{where}.{key}", "is empty; write the text")
    elif kind is list:
      if not isinstance(v, list):
        self.fail(f"{where}.{key}", f"expected a list, got {type(v).__name__}")
    elif kind is int:
      if not isinstance(v, int) or isinstance(v, bool):
        self.fail(f"{where}.{key}", f"expected an integer, got {type(v).__name__}")
    return v

  def unknown(self, d: dict, allowed: Sequence[str], where: str):
    extra = sorted(set(d) - set(allowed))
    if extra:
      self.fail(where, f"unknown field(s) {extra}; allowed: {list(allowed)}")

  def conversation(self, d: dict, where: str, last: str = "assistant") -> list:
    conv = self.field(d, "conversation", where, list)
    w = f"{where}.conversation"
    if not conv:
      self.fail(w, "is empty; give at least one user and one assistant message")
    out = []
    for j, m in enumerate(conv):
      m = self.obj(m, f"{w}[{j}]")
      role = self.field(m, "role", f"{w}[{j}]")
      if role not in ROLES:
        self.fail(f"{w}[{j}].role", f"is {role!r}; use 'user' or 'assistant'")
      want = ROLES[j % 2]
      if role != want:
        self.fail(f"{w}[{j}].role", f"is {role!r} but turns must alternate starting with "
                  f"'user'; expected {want!r}")
      content = self.field(m, "content", f"{w}[{j}]")
      out.append({"role": role, "content": content})
    if out[-1]["role"] != last:
      self.fail(w, "must end with the assistant reply being critiqued" if last == "assistant"
                else "must end with a user turn (the options are the assistant's next reply)")
    return out

  def options(self, d: dict, where: str) -> tuple:
    opts = self.field(d, "options", where, list)
    if len(opts) < 2:
      self.fail(f"{where}.options", f"has {len(opts)} option(s); give at least 2")
    for j, o in enumerate(opts):
      if not isinstance(o, str) or not o.strip():
        self.fail(f"{where}.options[{j}]", "must be a non-empty string")
    ans = self.field(d, "answer", where, int)
    if not 0 <= ans < len(opts):
      self.fail(f"{where}.answer", f"is {ans}; must index options (0..{len(opts) - 1})")
    return tuple(opts), ans


def from_dict(data: Any, source: str = "<constitution>") -> Constitution:
  """Validates a parsed constitution JSON object."""
  c = _Checker(source)
  data = c.obj(data, "top level")
  c.unknown(data, ("name", "description", "principles", "choice_principles",
                   "critique_examples", "label_examples", "cot_examples", "axes"), "top level")
  name = c.field(data, "name", "top level")
  description = c.field(data, "description", "top level", allow_empty=True)

  principles = []
  plist = c.field(data, "principles", "top level", list)
  if not plist:
    c.fail("principles", "is empty; give at least one critique/revision principle")
  for i, p in enumerate(plist):
    w = f"principles[{i}]"
    p = c.obj(p, w)
    c.unknown(p, ("id", "critique_request", "revision_request"), w)
    principles.append(Principle(c.field(p, "id", w), c.field(p, "critique_request", w),
                                c.field(p, "revision_request", w)))
  choice = []
  for i, p in enumerate(_list(c, data, "choice_principles")):
    w = f"choice_principles[{i}]"
    p = c.obj(p, w)
    c.unknown(p, ("id", "text"), w)
    choice.append(ChoicePrinciple(c.field(p, "id", w), c.field(p, "text", w)))
  for key, items in (("principles", principles), ("choice_principles", choice)):
    seen = set()
    for i, p in enumerate(items):
      if p.id in seen:
        c.fail(f"{key}[{i}].id", f"duplicate id {p.id!r}; ids must be unique")
      seen.add(p.id)

  crit = []
  for i, e in enumerate(_list(c, data, "critique_examples")):
    w = f"critique_examples[{i}]"
    e = c.obj(e, w)
    c.unknown(e, ("conversation", "critique_request", "critique", "revision_request",
                  "revision"), w)
    crit.append(CritiqueExample(c.conversation(e, w), c.field(e, "critique_request", w),
                                c.field(e, "critique", w), c.field(e, "revision_request", w),
                                c.field(e, "revision", w)))
  label = []
  for i, e in enumerate(_list(c, data, "label_examples")):
    w = f"label_examples[{i}]"
    e = c.obj(e, w)
    c.unknown(e, ("conversation", "principle", "options", "answer"), w)
    conv = c.conversation(e, w, last="user")
    opts, ans = c.options(e, w)
    label.append(LabelExample(conv, c.field(e, "principle", w, allow_empty=True), opts, ans))
  cot = []
  for i, e in enumerate(_list(c, data, "cot_examples")):
    w = f"cot_examples[{i}]"
    e = c.obj(e, w)
    c.unknown(e, ("conversation", "principle", "options", "reasoning", "answer"), w)
    conv = c.conversation(e, w, last="user")
    opts, ans = c.options(e, w)
    cot.append(CoTExample(conv, c.field(e, "principle", w, allow_empty=True), opts,
                          c.field(e, "reasoning", w), ans))
  axes = _axes(c, data, [p.id for p in choice])
  return Constitution(name, description, tuple(principles), tuple(choice), tuple(crit),
                      tuple(label), tuple(cot), source=source, axes=axes)


def _axes(c: _Checker, data: dict, choice_ids: list) -> tuple:
  """`axes`: {axis name: [choice principle id, ...]}, every choice principle in
  exactly one axis."""
  if "axes" not in data:
    return ()
  axes = c.obj(data["axes"], "axes")
  if not axes:
    c.fail("axes", "is empty; name at least one axis or leave the field out")
  owner, out = {}, []
  for name, ids in axes.items():
    where = f"axes.{name}"
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_]+", name):
      c.fail(where, "axis names are letters, digits and underscores")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
      c.fail(where, "expected a non-empty list of choice principle ids")
    for i in ids:
      if i not in choice_ids:
        c.fail(where, f"{i!r} is not a choice principle id")
      if i in owner:
        c.fail(where, f"{i!r} is already in axis {owner[i]!r}; a principle has one axis")
      owner[i] = name
    out.append((name, tuple(ids)))
  missing = [i for i in choice_ids if i not in owner]
  if missing:
    c.fail("axes", f"choice principles {missing} are in no axis; give each one an axis")
  return tuple(out)


def _list(c: _Checker, data: dict, key: str) -> list:
  if key not in data:
    return []
  return c.field(data, key, "top level", list)


# ----------------------------------------------------------------------------
# Import of the paper's published prompt files (layout: ../shared/data/MANIFEST.md).

_PAPER_FILES = {
    "principles": "CritiqueRevisionInstructions.json",
    "critique_examples": "CritiqueRevisionFewShotPrompts.json",
    "choice_principles": "RLMadisonInstructions.json",
    "label_examples": "RLMadisonFewShotPrompts.json",
    "cot_examples": "RLMadisonPrecogFewShotPrompts.json",
}
_CRITIQUE_RE = re.compile(r"^\s*CritiqueRequest:\s*(.*?)\s*Critique:\s*$", re.S)
_REVISION_RE = re.compile(r"^\s*RevisionRequest:\s*(.*?)\s*Revision:\s*$", re.S)
_FEWSHOT_RE = re.compile(
    r"^(?P<conv>.*?)\n\nCritiqueRequest:\s*(?P<cr>.*?)\n\nCritique:\s*(?P<c>.*?)"
    r"\n\nRevisionRequest:\s*(?P<rr>.*?)\n\nRevision:\s*(?P<r>.*?)\s*(\n\nHuman:\s*)?$", re.S)
_HA_TURN = re.compile(r"\n\n(H|A):")
_OPTION_RE = re.compile(r"\(([A-Z])\)\s*\[\[\[(.*?)\]\]\]", re.S)
_ANSWER_RE = re.compile(r"answer is:?\s*\(([A-Z])\)\s*$")


def _paper_json(prompts_dir: str, key: str):
  path = os.path.join(prompts_dir, _PAPER_FILES[key])
  if not os.path.exists(path):
    raise ConstitutionError(f"{path}: file not found; point import_paper at the directory "
                            "holding the paper's prompt files")
  try:
    with open(path, encoding="utf-8") as f:
      return path, json.load(f)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ConstitutionError(f"{path}: not readable JSON ({e}); restore the original file") from None


def import_paper(prompts_dir: str) -> Constitution:
  """Reads the paper's five prompt files into a Constitution.

  Label examples keep the paper's single correct/incorrect pair; the correct
  option goes first in even-numbered and second in odd-numbered examples so
  few-shot answers do not all point to (A).
  """
  path, raw = _paper_json(prompts_dir, "principles")
  principles = []
  for pid, v in raw.items():
    w = f"{path}: {pid}"
    try:
      prompt = v["prompt"][0] if isinstance(v["prompt"], list) else v["prompt"]
      m1, m2 = _CRITIQUE_RE.match(prompt), _REVISION_RE.match(v["edit_request"])
    except (KeyError, IndexError, TypeError):
      raise ConstitutionError(f"{w}: expected {{prompt: [str], edit_request: str}}") from None
    if not m1 or not m2:
      raise ConstitutionError(f"{w}: not in CritiqueRequest:/RevisionRequest: layout")
    principles.append(Principle(pid, m1.group(1), m2.group(1)))

  path, raw = _paper_json(prompts_dir, "critique_examples")
  crit = []
  for i, s in enumerate(raw):
    m = _FEWSHOT_RE.match(s) if isinstance(s, str) else None
    if not m:
      raise ConstitutionError(f"{path}: entry {i}: not a Human/Assistant dialogue followed by "
                              "CritiqueRequest/Critique/RevisionRequest/Revision")
    conv = _conversation(m.group("conv"), f"{path}: entry {i}")
    crit.append(CritiqueExample(conv, m.group("cr"), m.group("c"), m.group("rr"), m.group("r")))

  path, raw = _paper_json(prompts_dir, "choice_principles")
  choice = []
  for i, s in enumerate(raw):
    t = s.strip()
    if t.endswith("Options:"):
      t = t[:-len("Options:")].strip()
    if not t:
      raise ConstitutionError(f"{path}: entry {i}: empty principle")
    choice.append(ChoicePrinciple(f"choice{i}", t))

  path, raw = _paper_json(prompts_dir, "label_examples")
  label = []
  for i, e in enumerate(raw):
    try:
      conv = _conversation(e["prompt"], f"{path}: entry {i}")
      good, bad = e["corrects"][0], e["incorrects"][0]
    except (KeyError, IndexError, TypeError):
      raise ConstitutionError(
          f"{path}: entry {i}: expected {{prompt, corrects, incorrects}}") from None
    if conv and conv[-1]["role"] == "assistant" and not conv[-1]["content"]:
      conv = conv[:-1]
    opts = (good.strip(), bad.strip()) if i % 2 == 0 else (bad.strip(), good.strip())
    label.append(LabelExample(conv, "", opts, 0 if i % 2 == 0 else 1))

  path, raw = _paper_json(prompts_dir, "cot_examples")
  cot = [_parse_cot(e.get("prompt") if isinstance(e, dict) else None, f"{path}: entry {i}")
         for i, e in enumerate(raw)]

  return Constitution("paper", "Principles and few-shot examples published with Bai et al. "
                      "(2022), imported from " + prompts_dir, tuple(principles), tuple(choice),
                      tuple(crit), tuple(label), tuple(cot), source=prompts_dir)


def _conversation(raw: str, where: str) -> list:
  try:
    msgs = text_lib.parse_transcript(raw, where)
  except text_lib.TranscriptError as e:
    raise ConstitutionError(str(e)) from None
  return [{"role": m["role"], "content": m["content"].strip()} for m in msgs]


def _parse_cot(s: Optional[str], where: str) -> CoTExample:
  if not isinstance(s, str) or "{}" not in s:
    raise ConstitutionError(f"{where}: expected a prompt string with a {{}} principle slot")
  head, _, tail = s.partition("{}")
  k = head.find("\n\nH:")
  if k < 0:
    raise ConstitutionError(f"{where}: no 'H:' turn before the principle slot")
  parts = _HA_TURN.split(head[k:].rstrip())
  conv = [{"role": "user" if who == "H" else "assistant", "content": c.strip()}
          for who, c in zip(parts[1::2], parts[2::2])]
  opts = tuple(o.strip() for _, o in _OPTION_RE.findall(tail))
  step = tail.find("Let's think step by step:")
  ans = _ANSWER_RE.search(tail.strip())
  if len(opts) < 2 or step < 0 or not ans:
    raise ConstitutionError(f"{where}: expected (A) [[[..]]] (B) [[[..]]] options, "
                            "\"Let's think step by step:\" reasoning and \"answer is: (X)\"")
  reasoning = tail[step + len("Let's think step by step:"):]
  reasoning = reasoning.split("\n\nHuman:")[0].strip()
  return CoTExample(conv, "", opts, reasoning, ord(ans.group(1)) - ord("A"))


# ----------------------------------------------------------------------------
# Critique / revision prompts.
#
# A revision prompt is a list of messages whose roles extend the chat roles
# with "critique_request", "critique", "revision_request" and "revision".
# Raw rendering writes them in the paper's layout ("\n\nCritiqueRequest: ...
# \n\nCritique: ..."); chat rendering maps requests to user turns and answers
# to assistant turns, so few-shot dialogues become prior turns of one chat.

RAW_TAGS = {"user": "Human", "assistant": "Assistant", "critique_request": "CritiqueRequest",
            "critique": "Critique", "revision_request": "RevisionRequest", "revision": "Revision"}
CHAT_ROLE = {"user": "user", "assistant": "assistant", "system": "system",
             "critique_request": "user", "critique": "assistant",
             "revision_request": "user", "revision": "assistant"}
# The model's reply that each request asks for.
ANSWER_ROLE = {"critique_request": "critique", "revision_request": "revision"}
RAW_STOPS = ["\n\nHuman:", "\n\nAssistant:", "\n\nCritiqueRequest:", "\n\nCritique:",
             "\n\nRevisionRequest:", "\n\nRevision:"]


def example_messages(ex: CritiqueExample) -> list[dict]:
  return list(ex.conversation) + [
      {"role": "critique_request", "content": ex.critique_request},
      {"role": "critique", "content": ex.critique},
      {"role": "revision_request", "content": ex.revision_request},
      {"role": "revision", "content": ex.revision}]


def revision_messages(conversation: Sequence[dict], response: str,
                      rounds: Sequence[dict], principle: Principle, step: str,
                      examples: Sequence[CritiqueExample] = (),
                      critique: Optional[str] = None, history: bool = True) -> list[dict]:
  """Messages for the next critique or revision request.

  conversation: the red-team prompt (ends with a user turn); response: the
  initial reply; rounds: finished rounds [{principle: Principle, critique:
  str or None, revision: str}]; step:
  "critique" (ask for a critique under `principle`), "revision" (ask for a
  revision given `critique`) or "direct_revision" (ask for a revision without
  a critique). history=False shows only the latest revision as the
  assistant's reply instead of the whole chain of earlier rounds.
  """
  msgs = []
  for ex in examples:
    msgs += example_messages(ex)
  msgs += [dict(m) for m in conversation]
  if history:
    msgs.append({"role": "assistant", "content": response})
    for r in rounds:
      if r.get("critique"):
        msgs.append({"role": "critique_request", "content": r["principle"].critique_request})
        msgs.append({"role": "critique", "content": r["critique"]})
      msgs.append({"role": "revision_request", "content": r["principle"].revision_request})
      msgs.append({"role": "revision", "content": r["revision"]})
  else:
    latest = rounds[-1]["revision"] if rounds else response
    msgs.append({"role": "assistant", "content": latest})
  if step == "critique":
    msgs.append({"role": "critique_request", "content": principle.critique_request})
  elif step == "revision":
    if critique is None:
      raise ValueError("step='revision' needs the critique")
    msgs.append({"role": "critique_request", "content": principle.critique_request})
    msgs.append({"role": "critique", "content": critique})
    msgs.append({"role": "revision_request", "content": principle.revision_request})
  elif step == "direct_revision":
    msgs.append({"role": "revision_request", "content": principle.revision_request})
  else:
    raise ValueError(f"unknown step {step!r}")
  return msgs


def render_revision_prompt(messages: Sequence[dict], fmt: str = "raw", tokenizer=None,
                           system: Optional[str] = None) -> str:
  """Renders revision messages; the text ends where the model's answer starts."""
  if fmt == "raw":
    out = [] if system is None else [system]
    for m in messages:
      tag = RAW_TAGS[m["role"]]
      out.append(f"\n\n{tag}: {m['content'].strip()}")
    last = messages[-1]["role"]
    if last in ANSWER_ROLE:
      out.append(f"\n\n{RAW_TAGS[ANSWER_ROLE[last]]}:")
    elif last == "user":
      out.append(text_lib.ASSISTANT)
    return "".join(out)
  chat = [{"role": CHAT_ROLE[m["role"]], "content": m["content"].strip()} for m in messages]
  if system is not None:
    chat.insert(0, {"role": "system", "content": system})
  return text_lib.render(chat, "chat", tokenizer, add_generation_prompt=True)


def stop_strings(fmt: str, tokenizer=None) -> list[str]:
  """Stops for critique/revision sampling: the end of the model's turn."""
  if fmt == "raw":
    return list(RAW_STOPS)
  return text_lib.stop_strings(fmt, tokenizer)

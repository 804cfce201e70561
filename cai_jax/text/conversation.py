"""The one conversation encoder: messages (+ a response) -> token ids.

Every stage turns text into tokens here: SFT and PM training examples, the
prompts the sampler continues, the label stage's questions, PPO's rewards and
values, and every evaluation. Two rules are therefore written once:

- **BOS** exactly as the tokenizer's own `encode` adds it (Llama, Mistral and
  Gemma tokenizers prepend one, SmolLM2's does not), and never twice when a chat
  template already wrote it into the text. Truncation keeps it.
- **Where a scalar head is read.** A scored conversation ends with the
  assistant's response and its end-of-turn marker: the template's marker in chat
  format (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`; whatever a template puts
  after it, such as a newline, is not part of the conversation), the tokenizer's
  EOS in raw format. The preference model is trained, the PPO reward is read and
  every evaluation scores at that last token, so the reward RL optimises is the
  score the report reads. It is also the token the policy samples to end its
  turn, and the one SFT teaches it to emit.

The prompt and the response are tokenised separately and concatenated, as the
sampler sees them (prompt ids, then generated ids).
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Union

import numpy as np

from cai_jax.text import render, stop_strings

# A response no template rewrites: finds what a template writes after the content.
_SENTINEL = "\u2063cai-jax-response\u2063"


@dataclasses.dataclass
class Encoded:
  ids: np.ndarray        # int32 [n]: prompt ids then response ids
  loss_mask: np.ndarray  # bool [n]: True on response tokens (what SFT predicts)

  @property
  def score_index(self) -> int:
    """The token whose scalar-head output is the conversation's score: the last."""
    return len(self.ids) - 1


def _bos_added(tokenizer) -> list[int]:
  """The special tokens `encode` puts in front of any text (usually [BOS] or [])."""
  with_special = list(tokenizer("a", add_special_tokens=True)["input_ids"])
  plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
  if with_special[len(with_special) - len(plain):] != plain:
    return []
  return with_special[:len(with_special) - len(plain)]


def _leading(tokenizer, ids: Sequence[int], prefix: Sequence[int]) -> list[int]:
  """The ids a truncation keeps in front: the tokenizer's prefix, or a BOS the chat
  template wrote itself."""
  bos = getattr(tokenizer, "bos_token_id", None)
  if prefix and list(ids[:len(prefix)]) == list(prefix):
    return list(prefix)
  if bos is not None and list(ids[:1]) == [bos]:
    return [bos]
  return []


def keep_end(tokenizer, ids: Sequence[int], n: int) -> list[int]:
  """At most n ids: the last ones of `ids`, with its leading BOS kept in front."""
  ids = list(ids)
  if len(ids) <= n:
    return ids
  pre = _leading(tokenizer, ids, _bos_added(tokenizer))
  return pre + ids[len(ids) - (n - len(pre)):]


def encode_text(tokenizer, text: str) -> list[int]:
  """Ids of a rendered prompt: the tokenizer's special prefix (BOS) is added unless
  the text already begins with it (a chat template that writes BOS itself)."""
  bos = getattr(tokenizer, "bos_token", None)
  add = not (bos and text.startswith(bos))
  return list(tokenizer(text, add_special_tokens=add)["input_ids"])


class ConversationEncoder:
  """Conversations in one prompt format ("chat": the tokenizer's template;
  "raw": the paper's Human:/Assistant: transcript) for one tokenizer."""

  def __init__(self, tokenizer, fmt: str, system: Optional[str] = None):
    if fmt not in ("chat", "raw"):
      raise ValueError(f"unknown prompt format {fmt!r}; use 'raw' or 'chat'")
    self.tok, self.fmt = tokenizer, fmt
    self.system = system or None
    self.prefix = _bos_added(tokenizer)
    self.end_of_turn = self._end_of_turn() if fmt == "chat" else ""
    eos = getattr(tokenizer, "eos_token_id", None)
    self.raw_end = [int(eos)] if fmt == "raw" and eos is not None else []

  def _end_of_turn(self) -> str:
    """The template's text after an assistant message, up to and including its
    end-of-turn marker."""
    msgs = [{"role": "user", "content": "hi"}]
    full = render(msgs + [{"role": "assistant", "content": _SENTINEL}], "chat", self.tok,
                  add_generation_prompt=False)
    k = full.rfind(_SENTINEL)
    tail = full[k + len(_SENTINEL):] if k >= 0 else ""
    ends = [(tail.find(s), s) for s in stop_strings("chat", self.tok) if s and s in tail]
    if ends:
      i, s = min(ends)
      return tail[:i + len(s)]
    return tail

  # ------------------------------------------------------------------ text
  def with_system(self, messages: Sequence[dict]) -> list[dict]:
    msgs = list(messages)
    if self.system and self.fmt == "chat" and not (msgs and msgs[0]["role"] == "system"):
      msgs = [{"role": "system", "content": self.system}] + msgs
    return msgs

  def prompt_text(self, messages: Sequence[dict]) -> str:
    """The conversation so far, ending where the assistant's reply begins."""
    text = render(self.with_system(messages), self.fmt, self.tok, add_generation_prompt=True)
    # Raw prompts carry a system text as a plain prefix.
    return (self.system + text) if self.system and self.fmt == "raw" else text

  def response_text(self, response: str) -> str:
    """The response as it follows the prompt, with the chat end-of-turn marker."""
    if self.fmt == "raw":
      return " " + response.lstrip(" ")
    return response + self.end_of_turn

  # ------------------------------------------------------------------ ids
  def text_ids(self, text: str) -> list[int]:
    return encode_text(self.tok, text)

  def prompt_ids(self, prompt: Union[str, Sequence[dict]]) -> list[int]:
    """Ids of a rendered prompt string or of a message list."""
    text = prompt if isinstance(prompt, str) else self.prompt_text(prompt)
    return encode_text(self.tok, text)

  def response_ids(self, response: str) -> list[int]:
    ids = list(self.tok(self.response_text(response), add_special_tokens=False)["input_ids"])
    return ids + self.raw_end

  def conversation(self, prompt: Union[str, Sequence[dict]], response: str,
                   max_len: Optional[int] = None, keep: str = "end") -> Encoded:
    """Prompt + response ids; the score is read at the last one.

    max_len: at most this many ids. keep="end" (scoring) drops the oldest prompt
    tokens; keep="response" (SFT) keeps the end of the prompt and the start of the
    response (at least half the row for the prompt while the response is long).
    The tokenizer's BOS stays in front either way.
    """
    p_ids, r_ids = self.prompt_ids(prompt), self.response_ids(response)
    if max_len is not None and len(p_ids) + len(r_ids) > max_len:
      p_ids, r_ids = self._truncate(p_ids, r_ids, int(max_len), keep)
    ids = np.asarray(p_ids + r_ids, np.int32)
    mask = np.zeros(len(ids), bool)
    mask[len(p_ids):] = True
    return Encoded(ids, mask)

  def _truncate(self, p_ids: list, r_ids: list, n: int, keep: str):
    # The leading BOS stays, whether the tokenizer added it or the template wrote it.
    pre = _leading(self.tok, p_ids, self.prefix)
    body = p_ids[len(pre):]
    room = n - len(pre)
    if room < 1:
      raise ValueError(f"max_len={n} leaves no room after the tokenizer's {len(pre)} prefix ids")
    if keep == "end":
      both = (body + r_ids)[-room:]
      cut = max(0, len(body) + len(r_ids) - room)
      kept_p = max(0, len(body) - cut)
      return pre + both[:kept_p], both[kept_p:]
    if keep != "response":
      raise ValueError(f"keep={keep!r}; use 'end' or 'response'")
    keep_p = max(room - len(r_ids), min(len(body), room // 2))
    body = body[len(body) - keep_p:] if keep_p else []
    return pre + body, r_ids[:room - len(body)]

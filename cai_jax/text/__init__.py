"""Conversations as message lists, rendered raw (Human/Assistant) or by chat template.

The paper and the hh-rlhf files use the raw transcript format
"\\n\\nHuman: ...\\n\\nAssistant: ...". Instruct models such as SmolLM2 expect
their tokenizer's chat template. Stages build message lists and call `render`
with the configured format, so the same code serves both.
"""
from __future__ import annotations

import re
from typing import Iterable, Optional, Sequence

HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"
_TURN = re.compile(r"\n\n(Human|Assistant):")

Message = dict  # {"role": "user"|"assistant"|"system", "content": str}


class TranscriptError(ValueError):
  pass


def parse_transcript(text: str, source: str = "transcript") -> list[Message]:
  """Raw "\\n\\nHuman: ..\\n\\nAssistant: .." text -> message list."""
  if not text.startswith("\n\n"):
    text = "\n\n" + text.lstrip("\n")
  parts = _TURN.split(text)
  if parts[0].strip():
    raise TranscriptError(f"{source}: text before the first Human:/Assistant: turn")
  msgs = []
  for speaker, content in zip(parts[1::2], parts[2::2]):
    role = "user" if speaker == "Human" else "assistant"
    msgs.append({"role": role, "content": content[1:] if content.startswith(" ") else content})
  if not msgs:
    raise TranscriptError(f"{source}: no Human:/Assistant: turns")
  return msgs


def to_transcript(messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
  """Message list -> raw transcript; optionally ends with "\\n\\nAssistant:"."""
  out = []
  for m in messages:
    if m["role"] == "system":
      out.append(m["content"])
      continue
    tag = HUMAN if m["role"] == "user" else ASSISTANT
    out.append(f"{tag} {m['content']}" if m["content"] else tag)
  if add_generation_prompt:
    out.append(ASSISTANT)
  return "".join(out)


def split_prompt_response(chosen: str, rejected: str) -> tuple[str, str, str]:
  """Shared prefix up to the final "\\n\\nAssistant:" -> (prompt, chosen, rejected).

  Splits on the common prefix of the two transcripts, not on the last
  Assistant tag, because some replies themselves contain "Human:"/"Assistant:".
  """
  n = 0
  for a, b in zip(chosen, rejected):
    if a != b:
      break
    n += 1
  if n == len(chosen) == len(rejected):
    k = chosen.rfind(ASSISTANT)
  else:
    # The tag must lie wholly inside the shared prefix chosen[:n].
    k = chosen.rfind(ASSISTANT, 0, n)
  if k < 0:
    raise TranscriptError("no Assistant turn shared by chosen and rejected")
  cut = k + len(ASSISTANT)
  return chosen[:cut], chosen[cut:], rejected[cut:]


def render(messages: Sequence[Message], fmt: str = "raw", tokenizer=None,
           add_generation_prompt: bool = True, continue_final: bool = False) -> str:
  """Renders messages as text for the model.

  fmt="raw": paper format. fmt="chat": the tokenizer's chat template.
  continue_final: leave the final assistant message open so the model
  continues it (used for few-shot answers like " (A").
  """
  if fmt == "raw":
    text = to_transcript(messages, add_generation_prompt=add_generation_prompt and not continue_final)
    return text
  if fmt != "chat":
    raise ValueError(f"unknown prompt format {fmt!r}; use 'raw' or 'chat'")
  if tokenizer is None:
    raise ValueError("fmt='chat' needs a tokenizer")
  if continue_final:
    return tokenizer.apply_chat_template(list(messages), tokenize=False,
                                         continue_final_message=True)
  return tokenizer.apply_chat_template(list(messages), tokenize=False,
                                       add_generation_prompt=add_generation_prompt)


def stop_strings(fmt: str, tokenizer=None) -> list[str]:
  """Default stop strings for a prompt format."""
  if fmt == "raw":
    return [HUMAN, "\n\nHuman", ASSISTANT]
  stops = []
  if tokenizer is not None and tokenizer.eos_token:
    stops.append(tokenizer.eos_token)
  for s in ("<|im_end|>", "<end_of_turn>", "<|eot_id|>"):
    if tokenizer is not None and s in tokenizer.get_vocab() and s not in stops:
      stops.append(s)
  return stops

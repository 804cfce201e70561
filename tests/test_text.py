"""Transcript parsing/rendering and the hh-rlhf prompt/response split."""
import pytest

from cai_jax import text


def test_transcript_roundtrip():
  raw = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: How are you?\n\nAssistant:"
  msgs = text.parse_transcript(raw)
  assert msgs == [{"role": "user", "content": "Hi there"},
                  {"role": "assistant", "content": "Hello!"},
                  {"role": "user", "content": "How are you?"},
                  {"role": "assistant", "content": ""}]
  assert text.to_transcript(msgs) == raw
  assert text.render(msgs[:3], fmt="raw") == raw


def test_split_on_shared_prefix_when_reply_mentions_turns():
  prompt = "\n\nHuman: Write a script\n\nAssistant:"
  chosen = prompt + " Sure.\n\nHuman: line one\n\nAssistant: line two"
  rejected = prompt + " No."
  p, c, r = text.split_prompt_response(chosen, rejected)
  assert p == prompt and c == " Sure.\n\nHuman: line one\n\nAssistant: line two" and r == " No."


def test_split_when_replies_share_a_prefix():
  prompt = "\n\nHuman: Q\n\nAssistant:"
  p, c, r = text.split_prompt_response(prompt + " The answer is A", prompt + " The answer is B")
  assert p == prompt and c == " The answer is A" and r == " The answer is B"


def test_chat_render_and_stops(smollm2):
  _, _, tok = smollm2
  msgs = [{"role": "user", "content": "Hi"}]
  s = text.render(msgs, fmt="chat", tokenizer=tok)
  assert s.endswith("<|im_start|>assistant\n") and "Hi" in s
  assert "<|im_end|>" in text.stop_strings("chat", tok)
  with pytest.raises(ValueError):
    text.render(msgs, fmt="other", tokenizer=tok)


def test_bad_transcript():
  with pytest.raises(text.TranscriptError):
    text.parse_transcript("no turns here")

"""TFDS builder (array_record, no TensorFlow) for the label stage's AI preferences.

One example per comparison, with typed fields so the preference-model stage
can read soft labels without parsing JSON:

  id, prompt (JSON message list), response_a, response_b, principle_ids,
  p_a (float32 soft label that A is better), logp_a, logp_b, cot (strings).

  sources = build("WORKDIR/label/preferences.jsonl", "WORKDIR/label/tfds")
  rec = decode(sources["train"][0])   # the jsonl record (p_a as a Python float)
  recs = load("WORKDIR/label")        # every record, from the TFDS dataset
"""
from __future__ import annotations

import json
import os

import numpy as np
import tensorflow_datasets as tfds

from cai_jax.data import builders
from cai_jax.utils import InputError, read_jsonl

_FLOATS = ("p_a", "logp_a", "logp_b")


class AiPreferences(builders._LocalBuilder):  # pylint: disable=protected-access
  name = "cai_ai_preferences"

  def _info(self):
    return self.dataset_info_from_configs(
        disable_shuffling=True,
        description="AI-feedback comparisons with soft labels (cai_jax label stage).",
        features=tfds.features.FeaturesDict({
            "id": tfds.features.Text(),
            "prompt": tfds.features.Text(),
            "response_a": tfds.features.Text(),
            "response_b": tfds.features.Text(),
            "principle_ids": tfds.features.Sequence(tfds.features.Text()),
            "p_a": np.float32, "logp_a": np.float32, "logp_b": np.float32,
            "cot": tfds.features.Sequence(tfds.features.Text()),
        }))

  def _generate_examples(self, path):
    for i, r in enumerate(read_jsonl(path)):
      where = f"{path}:{i + 1}"
      missing = [k for k in ("id", "prompt", "response_a", "response_b", "p_a") if k not in r]
      if missing:
        raise InputError(f"{where}: preference record lacks {missing}; regenerate it with "
                         "the label stage")
      p = float(r["p_a"])
      if not 0.0 <= p <= 1.0:
        raise InputError(f"{where}: p_a={p} outside [0, 1]")
      yield i, {"id": str(r["id"]), "prompt": json.dumps(r["prompt"], ensure_ascii=False),
                "response_a": r["response_a"], "response_b": r["response_b"],
                "principle_ids": [str(x) for x in r.get("principle_ids", [])],
                "p_a": p, "logp_a": float(r.get("logp_a", np.nan)),
                "logp_b": float(r.get("logp_b", np.nan)),
                "cot": [str(x) for x in r.get("cot", [])]}


def build(path: str, data_dir: str, split: str = "train"):
  """split -> data source (rebuilt only when the jsonl file changed)."""
  os.makedirs(data_dir, exist_ok=True)
  config = builders._config({split: path}, "preferences")  # pylint: disable=protected-access
  builder = AiPreferences(config=config, data_dir=data_dir, file_format="array_record")
  builders.prepare(builder)  # reads the local jsonl only; nothing is downloaded
  return builder.as_data_source()


def decode(example: dict) -> dict:
  out = builders.decode(example)
  out["prompt"] = json.loads(out["prompt"])
  for k in _FLOATS:
    out[k] = float(out[k])
  out["principle_ids"] = list(out.get("principle_ids", []))
  out["cot"] = list(out.get("cot", []))
  return out


def load(stage_dir: str, split: str = "train") -> list:
  """Every preference record of WORKDIR/label, read through the TFDS dataset."""
  src = build(os.path.join(stage_dir, "preferences.jsonl"), os.path.join(stage_dir, "tfds"),
              split)
  ds = src[split]
  return [decode(ds[i]) for i in range(len(ds))]

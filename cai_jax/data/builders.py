"""TFDS builders (array_record, no TensorFlow) for local files.

- `HhRlhf`: hh-rlhf comparison split files (harmless-base, helpful-*; train/test).
- `RedTeamAttempts`: hh-rlhf red-team-attempts transcripts.
- `JsonRecords`: records the project generates (revise records, helpful
  samples, generated prompts), one JSON object per example.

Each builder reads local files by path; the builder config name carries a hash
of the paths, sizes and modification times, so a changed input rebuilds and an
unchanged one is reused. Read the result with `as_data_source()`:

  sources = build_hh_rlhf({"test": ".../harmless-base/test.jsonl.gz"}, data_dir)
  pair = decode(sources["test"][0])   # {"id", "prompt", "chosen", "rejected"}
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from typing import Mapping

import numpy as np
import tensorflow_datasets as tfds

from cai_jax.data import sources
from cai_jax.utils import InputError, read_jsonl


@dataclasses.dataclass(eq=False)
class LocalFilesConfig(tfds.core.BuilderConfig):
  """files: split name -> local path."""
  files: tuple = ()


def _config(files: Mapping[str, str] | str, kind: str) -> LocalFilesConfig:
  if isinstance(files, str):
    files = {_split_name(files): files}
  stamp = []
  for split, path in sorted(files.items()):
    if not re.fullmatch(r"[A-Za-z0-9_]+", split):
      raise InputError(f"{path}: split name {split!r} must be letters, digits or _")
    if not os.path.isfile(path):
      raise InputError(f"{path}: file not found; give the local {kind} file")
    st = os.stat(path)
    stamp.append(f"{split}={os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}")
  digest = hashlib.sha1("|".join(stamp).encode()).hexdigest()[:12]
  return LocalFilesConfig(name=f"{kind}_{digest}", files=tuple(sorted(files.items())),
                          version=tfds.core.Version("1.0.0"))


def _split_name(path: str) -> str:
  stem = os.path.basename(path).split(".")[0]
  return re.sub(r"[^A-Za-z0-9_]", "_", stem) or "train"


class _LocalBuilder(tfds.core.GeneratorBasedBuilder):
  """Builds one split per local file, in file order (disable_shuffling in _info)."""
  VERSION = tfds.core.Version("1.0.0")

  def _split_generators(self, dl_manager):
    return {split: self._generate_examples(path) for split, path in self.builder_config.files}


class HhRlhf(_LocalBuilder):
  name = "cai_hh_rlhf"

  def _info(self):
    return self.dataset_info_from_configs(
        disable_shuffling=True,
        description="hh-rlhf comparison pairs split into shared prompt and two replies.",
        features=tfds.features.FeaturesDict({
            "id": tfds.features.Text(), "prompt": tfds.features.Text(),
            "chosen": tfds.features.Text(), "rejected": tfds.features.Text()}))

  def _generate_examples(self, path):
    for i, r in enumerate(sources.hh_rlhf_pairs(path)):
      yield i, r


class RedTeamAttempts(_LocalBuilder):
  name = "cai_red_team_attempts"

  def _info(self):
    return self.dataset_info_from_configs(
        disable_shuffling=True,
        description="hh-rlhf red-team attempts with the prompt (conversation up to the "
        "final Assistant turn) as JSON messages.",
        features=tfds.features.FeaturesDict({
            "id": tfds.features.Text(), "transcript": tfds.features.Text(),
            "prompt": tfds.features.Text(),  # JSON message list
            "rating": np.float32, "min_harmlessness_score_transcript": np.float32,
            "task_description": tfds.features.Text(), "num_params": tfds.features.Text(),
            "model_type": tfds.features.Text(),
            "tags": tfds.features.Sequence(tfds.features.Text())}))

  def _generate_examples(self, path):
    for i, r in enumerate(sources.red_team_attempts(path)):
      r = dict(r, prompt=json.dumps(r["prompt"], ensure_ascii=False))
      yield i, r


class JsonRecords(_LocalBuilder):
  name = "cai_json_records"

  def _info(self):
    return self.dataset_info_from_configs(
        disable_shuffling=True,
        description="Generated records (revise, helpful samples, generated prompts), one "
        "JSON object per example.",
        features=tfds.features.FeaturesDict({
            "id": tfds.features.Text(), "json": tfds.features.Text()}))

  def _generate_examples(self, path):
    for i, r in enumerate(read_jsonl(path)):
      if not isinstance(r, dict) or "id" not in r:
        raise InputError(f"{path}:{i + 1}: expected an object with an 'id'")
      yield i, {"id": str(r["id"]), "json": json.dumps(r, ensure_ascii=False)}


def prepare(builder) -> None:
  """builder.download_and_prepare() for a local build (nothing is downloaded): TFDS's
  "Downloading and preparing" banner and progress bars go to the log, not the terminal."""
  import contextlib
  import io
  import logging
  out = io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
    builder.download_and_prepare()
  text = out.getvalue().strip()
  if text:
    logging.getLogger(__name__).info("TFDS: %s", text, extra={"file_only": True})


def _build(cls, files, kind: str, data_dir: str):
  os.makedirs(data_dir, exist_ok=True)
  builder = cls(config=_config(files, kind), data_dir=data_dir, file_format="array_record")
  prepare(builder)
  return builder.as_data_source()


def build_hh_rlhf(files: Mapping[str, str] | str, data_dir: str):
  """split -> data source of hh-rlhf pairs (builds once per input version)."""
  return _build(HhRlhf, files, "hh_rlhf", data_dir)


def build_red_team(files: Mapping[str, str] | str, data_dir: str):
  return _build(RedTeamAttempts, files, "red_team", data_dir)


def build_records(files: Mapping[str, str] | str, data_dir: str):
  return _build(JsonRecords, files, "records", data_dir)


def decode(example: dict) -> dict:
  """bytes -> str; JSON fields ("json", red-team "prompt") -> objects."""
  out = {}
  for k, v in example.items():
    if isinstance(v, bytes):
      v = v.decode("utf-8")
    elif isinstance(v, (list, tuple)) or (isinstance(v, np.ndarray) and v.dtype == object):
      v = [x.decode("utf-8") if isinstance(x, bytes) else x for x in list(v)]
    elif isinstance(v, np.generic):
      v = v.item()
    out[k] = v
  if "json" in out and set(out) == {"id", "json"}:
    return json.loads(out["json"])
  if "transcript" in out and isinstance(out.get("prompt"), str):
    out["prompt"] = json.loads(out["prompt"])
  return out

"""One Orbax CheckpointManager per stage: train state + data-iterator state.

`Manager(dir, max_to_keep, save_interval_steps)` saves an arbitrary pytree of
arrays (train state, RNG key, step) together with a JSON-able dict (the data
iterator's position, run metadata) under `dir/<step>/`. Restores check the
saved shapes against the expected ones first, so a checkpoint of another model
raises a one-line InputError instead of an error deep inside Orbax.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from cai_jax.utils import InputError, atomic_write_text, epath, resolve_dir

MODEL_CONFIG_FILE = "model_config.json"


class Manager:
  """Thin wrapper over ocp.CheckpointManager with items "state" and "data"."""

  def __init__(self, directory: str, max_to_keep: int = 3, save_interval_steps: int = 1,
               async_save: bool = True, read_only: bool = False):
    # Local paths are made absolute; gs:// URLs go to Orbax (tensorstore) unchanged.
    self.directory = resolve_dir(directory)
    if read_only and not epath(self.directory).is_dir():
      raise InputError(f"{self.directory}: checkpoint directory not found")
    opts = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, save_interval_steps=max(int(save_interval_steps), 1),
        create=not read_only, enable_async_checkpointing=async_save, read_only=read_only)
    self._mngr = ocp.CheckpointManager(
        self.directory, options=opts, item_names=("state", "data"),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": ocp.JsonCheckpointHandler()})

  # --------------------------------------------------------------- saving
  def should_save(self, step: int) -> bool:
    return self._mngr.should_save(step)

  def save(self, step: int, state, data: Optional[dict] = None, force: bool = False) -> bool:
    """Saves when the interval policy says so (or `force`); returns whether it did."""
    if step in self._mngr.all_steps():
      return False
    return self._mngr.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      data=ocp.args.JsonSave(data or {})), force=force)

  def wait(self):
    self._mngr.wait_until_finished()

  def close(self):
    self._mngr.wait_until_finished()
    self._mngr.close()

  # ------------------------------------------------------------- restoring
  def latest_step(self) -> Optional[int]:
    return self._mngr.latest_step()

  def all_steps(self):
    return list(self._mngr.all_steps())

  def damaged(self, step: int, e: BaseException) -> InputError:
    """The one-line error for an unreadable checkpoint step, with the fix."""
    earlier = [s for s in self.all_steps() if s < step]
    fix = (f"to resume from step {max(earlier)}" if earlier else "to start this phase over")
    why = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
    return InputError(f"checkpoint step {step} under {self.directory} is damaged "
                      f"({type(e).__name__}: {why}): delete {self.directory}/{step} {fix}")

  def saved_shapes(self, step: int) -> dict:
    """{"a/b/c": shape} of the saved state, read from metadata only."""
    try:
      meta = self._mngr.item_metadata(step)
      tree = meta["state"]
    except Exception as e:  # pylint: disable=broad-except  # Orbax, TensorStore, JSON errors alike
      raise self.damaged(step, e) from None
    if tree is None:
      raise self.damaged(step, ValueError("no readable train state"))
    tree = tree.tree if hasattr(type(tree), "tree") else tree
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      shape = getattr(leaf, "shape", None)
      if shape is not None:
        out[_path_str(path)] = tuple(shape)
    return out

  def check_compatible(self, step: int, target, what: str = "state") -> None:
    """InputError unless every array of `target` has its saved shape."""
    saved = self.saved_shapes(step)
    for path, leaf in jax.tree_util.tree_flatten_with_path(target)[0]:
      name = _path_str(path)
      want = tuple(getattr(leaf, "shape", ()))
      if name not in saved:
        raise InputError(
            f"{self.directory}/{step}: checkpoint has no {what} entry {name!r} "
            f"(saved by a different model or optimizer); use a fresh workdir or matching config")
      if saved[name] != want:
        raise InputError(
            f"{self.directory}/{step}: {what} entry {name!r} has shape {saved[name]}, this run "
            f"expects {want} (checkpoint of another model shape); use a fresh workdir or the "
            f"model the checkpoint was trained from")

  def restore(self, step: Optional[int] = None, target=None, check: bool = True):
    """(state, data) at `step` (latest if None). `target`: a pytree of arrays or
    ShapeDtypeStructs (with shardings) giving structure, dtypes and placement."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise InputError(f"{self.directory}: no checkpoint to restore")
    if target is not None and check:
      self.check_compatible(step, target)
    if target is not None:
      target = jax.tree_util.tree_map(_abstract, target)
      state_arg = ocp.args.StandardRestore(target)
    else:
      state_arg = ocp.args.StandardRestore()
    try:
      out = self._mngr.restore(step, args=ocp.args.Composite(
          state=state_arg, data=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except  # Orbax, TensorStore, JSON errors alike
      raise self.damaged(step, e) from None
    return out["state"], out["data"]


def _abstract(x):
  if isinstance(x, jax.ShapeDtypeStruct):
    return x
  sharding = getattr(x, "sharding", None)
  return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)


def _path_str(path) -> str:
  parts = []
  for p in path:
    for attr in ("key", "name", "idx"):
      if hasattr(p, attr):
        parts.append(str(getattr(p, attr)))
        break
    else:
      parts.append(str(p))
  return "/".join(parts)


def write_model_config(directory: str, cfg, extra: Optional[dict] = None) -> None:
  """Records the model config beside the checkpoints so `init_from` can rebuild it."""
  d = dict(cfg.to_hf_dict())
  d.update(extra or {})
  atomic_write_text(os.path.join(directory, MODEL_CONFIG_FILE), json.dumps(d, indent=2) + "\n")


def find_checkpoint_dir(path: str) -> Optional[str]:
  """The Orbax directory of a stage (its dir, its checkpoints/ dir), else None."""
  for d in (os.path.join(path, "checkpoints"), path):
    if epath(os.path.join(d, MODEL_CONFIG_FILE)).is_file():
      return d
  return None


def load_params_from_stage(path: str, **overrides):
  """(cfg, params) from the latest checkpoint of an earlier stage's directory."""
  from cai_jax import models
  d = find_checkpoint_dir(path)
  if d is None:
    raise InputError(f"{path}: not a stage checkpoint directory (no {MODEL_CONFIG_FILE})")
  hf = json.loads(epath(os.path.join(d, MODEL_CONFIG_FILE)).read_text())
  cfg = models.ModelConfig.from_hf_dict(hf, source=os.path.join(d, MODEL_CONFIG_FILE), **overrides)
  mngr = Manager(d, read_only=True)
  step = mngr.latest_step()
  if step is None:
    raise InputError(f"{d}: no completed checkpoint; finish that stage or point init_from elsewhere")
  state, _ = mngr.restore(step)
  train = state["train"] if isinstance(state, dict) and "train" in state else state
  params = train["params"] if isinstance(train, dict) else train.params
  logging.info("init_from %s step %d", d, step)
  return cfg, jax.tree_util.tree_map(np.asarray, params)

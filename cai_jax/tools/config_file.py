"""Loads a config file ("path.py" or "path.py:arg") as `cai_jax.main --config` does.

For notebooks and tools that run the pipeline from Python instead of the
command line.
"""
from __future__ import annotations

import importlib.util
import os

from cai_jax.utils import InputError


# The project's configs/ folder, beside the installed (editable) package.
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "configs")


def resolve(path: str) -> str:
  """A config file path; a bare name ("demo", "tiny.py") is looked up in CONFIG_DIR."""
  if os.path.isfile(path) or os.sep in path:
    return path
  named = os.path.join(CONFIG_DIR, path if path.endswith(".py") else path + ".py")
  return named if os.path.isfile(named) else path


def load(spec: str):
  """The ConfigDict from `get_config(arg)` of the file named by `spec` (a path, or a
  name in the project's configs/ folder), with an optional ":arg"."""
  path, _, arg = str(spec).partition(":")
  path = resolve(path)
  if not os.path.isfile(path):
    names = sorted(n[:-3] for n in os.listdir(CONFIG_DIR) if n.endswith(".py")) \
        if os.path.isdir(CONFIG_DIR) else []
    raise InputError(f"{path}: config file not found; pass a path such as configs/tiny.py"
                     + (f" or a name: {', '.join(names)}" if names else ""))
  mod_spec = importlib.util.spec_from_file_location("_cai_jax_config_file", path)
  mod = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(mod)
  if not hasattr(mod, "get_config"):
    raise InputError(f"{path}: no get_config(arg) function; a config file defines one")
  return mod.get_config(arg) if arg else mod.get_config()


def override(config, point: dict):
  """A copy of `config` with dotted fields set, e.g. {"revise.num_revisions": 2}.

  A comma-separated string given for a tuple field becomes the tuple of its items
  ({"reuse_stages": "revise,sft"} as ("revise", "sft"))."""
  c = config.copy_and_resolve_references()
  for key, value in point.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    if isinstance(value, str) and isinstance(node.get(leaf, None), tuple):
      value = tuple(s.strip() for s in value.split(",") if s.strip())
    node[leaf] = value
  return c

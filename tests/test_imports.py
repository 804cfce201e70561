"""Imports flow downward: models -> sampling / training / rl / evaluation -> the stage
runtime -> stages -> pipeline / main. Every import in the package (function-level
ones included) is read from the source and checked against the layers."""
import ast
import os

import pytest

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "cai_jax")

# Module prefix -> layer; the longest matching prefix wins. A module may import its own
# layer and the layers below it.
LAYERS = {
    "cai_jax.utils": 0, "cai_jax.text": 0, "cai_jax.cpu_backend": 0, "cai_jax.constitution": 0,
    "cai_jax.data": 0, "cai_jax.tools.config_file": 0, "cai_jax.resources": 0,
    # The model and how its arrays are laid out over devices and hosts.
    "cai_jax.models": 1, "cai_jax.sharding": 1, "cai_jax.multihost": 1,
    "cai_jax.interrupts": 1,
    "cai_jax.sampling": 2, "cai_jax.training": 2, "cai_jax.rl": 2, "cai_jax.evaluation": 2,
    "cai_jax.roles": 2, "cai_jax.feedback": 2,
    "cai_jax.runtime": 3,
    "cai_jax.stages": 4,
    "cai_jax.pipeline": 5, "cai_jax.main": 5, "cai_jax.chat": 5, "cai_jax.tools": 5,
    "cai_jax": 5,
}
NAMES = {0: "base (utils, text, data, ...)", 1: "models, sharding",
         2: "libraries (sampling, training, rl, evaluation, roles, feedback)",
         3: "stage runtime", 4: "stages", 5: "pipeline / entry points"}


def _layer(module: str) -> int:
  best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
  return LAYERS[best]


def _modules():
  for root, _, files in os.walk(PKG):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(root, f)
        rel = os.path.relpath(path, os.path.dirname(PKG))[:-3].replace(os.sep, ".")
        yield (rel[:-len(".__init__")] if rel.endswith(".__init__") else rel), path


def _imports(module: str, path: str):
  tree = ast.parse(open(path, encoding="utf-8").read(), path)
  pkg = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for a in node.names:
        yield a.name, node.lineno
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = pkg.split(".")
        base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
      for a in node.names:
        # `from cai_jax import stages` names a module; `from x import y` may too.
        yield (f"{base}.{a.name}" if base in ("cai_jax", "cai_jax.stages") else base,
               node.lineno)


def _violations():
  out = []
  for module, path in _modules():
    mine = _layer(module)
    for target, line in _imports(module, path):
      if not target.startswith("cai_jax"):
        continue
      if _layer(target) > mine:
        out.append(f"{module}:{line} imports {target} ({NAMES[mine]} -> {NAMES[_layer(target)]})")
      if module.startswith("cai_jax.stages.") and target.startswith("cai_jax.stages.") and \
          target != module:
        out.append(f"{module}:{line} imports another stage, {target}")
  return out


def test_imports_flow_downward():
  assert _violations() == []


def test_the_walker_sees_upward_imports(tmp_path, monkeypatch):
  """The check can fail: an upward and a sideways stage import are reported."""
  fake = tmp_path / "cai_jax"
  (fake / "training").mkdir(parents=True)
  (fake / "stages").mkdir()
  (fake / "training" / "init.py").write_text("from cai_jax.stages import common\n")
  (fake / "stages" / "pm.py").write_text("def f():\n  from cai_jax.stages.sft import x\n")
  monkeypatch.setattr(__import__(__name__), "PKG", str(fake))
  got = _violations()
  assert any("cai_jax.training.init:1 imports cai_jax.stages.common" in v for v in got), got
  assert any("cai_jax.stages.pm:2 imports another stage, cai_jax.stages.sft" in v for v in got)


@pytest.mark.parametrize("module", ["cai_jax.runtime", "cai_jax.pipeline", "cai_jax.main"])
def test_entry_layers_import(module):
  __import__(module)

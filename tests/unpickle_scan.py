"""``python tests/unpickle_scan.py ROOT``: print, as JSON, where ROOT's Python files unpickle.

Output: ``{"offenders": ["path:line", ...], "np_loads": int}``. An offender imports
an unpickling module, calls a pickle loader, or passes ``allow_pickle`` anything but
``False``; ``np_loads`` counts ``np.load`` calls (numpy's default refuses pickles).

Run in its own interpreter: CPython 3.11.0-3.11.7 keeps the AST constructor's
recursion depth in interpreter-wide state (python/cpython#106905), so ``ast.parse``
inside the test process, whose Orbax and Grain threads outlive earlier tests, can
fail with a spurious ``SystemError: AST constructor recursion depth mismatch``.
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

UNPICKLERS = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve",
              "marshal"}
PICKLE_LOADERS = ("read_pickle", "pickle.load", "pickle.loads", "torch.load")


def _node_offences(node: ast.AST) -> list[str]:
  """The reasons one AST node unpickles (empty when it does not)."""
  if isinstance(node, ast.Import):
    return [f"import {a.name}" for a in node.names if a.name.split(".")[0] in UNPICKLERS]
  if isinstance(node, ast.ImportFrom):
    return [f"from {node.module}"] if (node.module or "").split(".")[0] in UNPICKLERS else []
  if not isinstance(node, ast.Call):
    return []
  func = ast.unparse(node.func)
  reasons = [f"calls {func}"] if func.endswith(PICKLE_LOADERS) else []
  for keyword in node.keywords:
    if keyword.arg == "allow_pickle" and not (
        isinstance(keyword.value, ast.Constant) and keyword.value.value is False):
      reasons.append("allow_pickle not False")
  return reasons


def scan(root: Path) -> dict:
  """Offenders (``path:line reason``) and the ``np.load`` count under ``root``."""
  offenders, np_loads = [], 0
  for path in sorted(root.rglob("*.py")):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      where = f"{path.relative_to(root.parent)}:{getattr(node, 'lineno', 0)}"
      offenders += [f"{where} {reason}" for reason in _node_offences(node)]
      if isinstance(node, ast.Call):
        np_loads += ast.unparse(node.func) in ("np.load", "numpy.load")
  return {"offenders": offenders, "np_loads": np_loads}


if __name__ == "__main__":
  print(json.dumps(scan(Path(sys.argv[1]))))

"""The registry of model kinds is the one place a kind is described, and it tells the truth."""

from __future__ import annotations

import ast
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny_data
from wmh_jax import configs
from wmh_jax.inference import forward
from wmh_jax.models import kinds
from wmh_jax.training import losses, train

PACKAGE = Path(__file__).resolve().parents[1] / "wmh_jax"
# Modules allowed to spell a kind's name: the registry, and the configs that choose one.
KIND_HOMES = {PACKAGE / "models" / "kinds.py", PACKAGE / "configs.py"}


def _outputs(kind: kinds.Kind) -> dict:
  """The physical outputs of ``kind``'s network on a 16x16x8 batch of 2, shapes only."""
  config = tiny_data.tiny_config(Path("m.csv"), Path("c"), kind=kind.name)
  model = kinds.build_model(config.model, voxel_target=1e-3)
  image = jax.ShapeDtypeStruct((2, 16, 16, 8, 1), jnp.float32)
  params = jax.eval_shape(model.init, jax.random.key(0), image)
  raw = jax.eval_shape(lambda p, x: model.apply(p, x), params, image)
  if "seg_logits" in raw:  # the forward pass turns logits into probabilities
    raw = {**{k: v for k, v in raw.items() if k != "seg_logits"}, "seg_prob": raw["seg_logits"]}
  arrays = {k: np.zeros(v.shape, v.dtype) for k, v in raw.items()}
  return forward.physical_outputs(arrays, volume_scale_ml=config.data.volume_scale_ml,
                                  voxel_ml=1e-3)


@pytest.mark.parametrize("name", kinds.NAMES)
def test_each_kind_outputs_what_its_entry_declares(name):
  kind = kinds.get(name)
  outputs = _outputs(kind)
  assert set(kind.outputs) == set(outputs) - {"pooled"}
  assert set(kind.predict_columns) <= set(kind.outputs)
  assert all(unit for unit in (kinds.UNITS[o] for o in kind.outputs))
  assert ("pooled" in outputs) == kind.volume_head
  assert ("seg_prob" in outputs) == kind.segmentation_head
  assert set(kind.maps) == {"attention", "seg_prob"} & set(outputs)


@pytest.mark.parametrize("name", kinds.NAMES)
def test_each_kind_names_loss_terms_and_weights_that_exist(name):
  config = configs.get_config()
  kind = kinds.get(name)
  for term, weight in kind.loss_terms:
    assert term in losses.TERMS
    if weight is not None:
      section, field = weight.split(".")
      assert isinstance(config[section][field], float)
  assert kind.score in kind.curves
  assert kind.score in ("val_icc", "val_dice")


def test_validation_scores_rank_by_the_declared_metric():
  records = [{"wmh_volume_ml": v, "severity": s} for v, s in ((1.0, 0), (2.0, 1), (4.0, 3))]
  weak = train.validation_metrics("weak", {"volume_ml": np.array([1.1, 2.2, 3.9])}, records)
  assert weak["val_score"] == weak["val_icc"]
  severity = train.validation_metrics("severity", {"severity": np.array([0, 1, 2])}, records)
  assert severity["val_score"] == severity["val_icc"] and severity["val_accuracy"] == 2 / 3


def test_an_unknown_kind_is_named_with_the_known_ones():
  with pytest.raises(ValueError, match=r"unknown model kind 'cnn'; expected one of \('weak'"):
    kinds.get("cnn")
  assert kinds.first_of(["joint", "weak"], lambda k: k.volume_head) == 1  # weak before joint
  assert kinds.first_of(["weak"], lambda k: k.segmentation_head) is None


def test_no_other_module_branches_on_a_kind_name():
  """No comparison with a kind's name and no table keyed by it outside the registry and the
  configs. ("severity" is also a data field, the manifest column, so it is not searched.)"""
  names = {"weak", "strong", "joint"}

  def named(node: ast.AST) -> bool:
    values = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
    return any(isinstance(v, ast.Constant) and v.value in names for v in values)

  found = []
  for path in sorted(PACKAGE.rglob("*.py")):
    if path in KIND_HOMES:
      continue
    for node in ast.walk(ast.parse(path.read_text())):
      branches = isinstance(node, ast.Compare) and any(
          named(n) for n in (node.left, *node.comparators))
      keyed = isinstance(node, ast.Dict) and any(k is not None and named(k) for k in node.keys)
      if branches or keyed:
        found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
  assert not found

"""Experiment files set only what differs from the base config."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from wmh_jax import configs

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def _assigned_fields(path: Path) -> list[str]:
  """Dotted fields ``config.<section>.<field> = ...`` assigned in a config file."""
  fields = []
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Assign):
      for target in node.targets:
        if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Attribute):
          if isinstance(target.value.value, ast.Name) and target.value.value.id == "config":
            fields.append(f"{target.value.attr}.{target.attr}")
  return fields


@pytest.mark.parametrize("name", ["weak", "strong", "joint", "severity"])
def test_an_experiment_file_sets_only_fields_that_differ_from_the_base(name):
  path = EXPERIMENTS / f"{name}.py"
  fields = _assigned_fields(path)
  assert "model.kind" in fields
  base = configs.flatten(json.loads(configs.get_config().to_json()))
  experiment = configs.flatten(json.loads(configs.load_config_file(str(path)).to_json()))
  same = [f for f in fields if json.dumps(experiment[f]) == json.dumps(base[f])
          and f != "model.kind"]
  assert not same, f"{path.name} repeats the base value of {same}"
  assert {f for f in base if base[f] != experiment[f]} <= set(fields)


def test_run_identity_is_the_one_rule_for_the_same_run():
  config = configs.get_config()
  stored = json.loads(config.to_json())
  assert configs.changed_fields(stored, config) == []
  # Runtime fields never make another run; a longer run may resume a shorter one.
  config.train.log_every_steps = 1
  config.train.num_epochs += 1
  assert configs.changed_fields(stored, config) == ["train.num_epochs"]
  assert configs.changed_fields(stored, config, ignore=configs.EXTENSIBLE_FIELDS) == []
  # A field added since the stored run was written counts at its default ...
  del stored["train"]["schedule"]
  assert "train.schedule" not in configs.changed_fields(stored, config)
  # ... except a recipe field, whose absence meant another recipe.
  del stored["model"]["pooled_norm"]
  assert configs.missing_recipe_fields(stored) == ["model.pooled_norm"]
  assert "model.pooled_norm" in configs.changed_fields(stored, config)
  # Tuples and lists are the same value; the identity is what the compile cache keys on.
  assert configs.run_identity(config)["data.shape"] == json.dumps(list(config.data.shape))

"""BIDS derivatives out: ``predict --bids_out=DIR`` lays its results out as a BIDS derivative dataset.

``DIR`` (conventionally ``<bids root>/derivatives/wmh_jax``) gets:

- ``dataset_description.json``: ``DatasetType`` derivative, ``GeneratedBy``
  with wmh-jax's name, version and the command line (:func:`write_description`);
- per scan, in ``sub-X[/ses-Y]/anat/``, the native-space maps that ``predict``
  wrote for the scan, renamed ``<source entities>_space-orig_desc-<d>_<suffix>.nii.gz``
  (:data:`MAP_NAMES`), each with a JSON sidecar naming its source image;
- ``volumes.tsv`` (+ ``volumes.json``): ``volumes.csv`` with
  ``participant_id``/``session_id`` first and ``n/a`` for empty cells.

``<d>`` is ``wmh`` when one model group ran, else ``wmh<Group>`` (the group
name's letters and digits, e.g. ``wmhStrong``), since a ``desc`` label is
alphanumeric. Each group's WMH mask is ``desc-<d>_mask``: the segmentation
(p > 0.5) for kinds with a segmentation head, the attention mask (paper §2.2)
for the weak kind. Files are hard links to ``predict``'s own outputs where
the file system allows (no second copy), copies otherwise, and every file is
replaced atomically.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from wmh_jax import __version__
from wmh_jax.data import bids
from wmh_jax.runtime import fileio

BIDS_VERSION = "1.10.0"
# predict's map name -> (desc label addition, BIDS suffix, description). The
# attention mask of a group without a segmentation mask is that group's mask
# (see `map_entities`).
MAP_NAMES = {
    "mask": ("", "mask", "WMH mask: the segmentation head's probability > 0.5, native space"),
    "prob": ("", "probseg", "WMH probability of the segmentation head, native space"),
    "attention_mask": ("Attention", "mask",
                       "WMH mask from the attention map: its N highest voxels, N = the predicted "
                       "volume / the voxel volume (paper §2.2), native space"),
    "attention": ("Attention", "map",
                  "attention map of the volume head (signed; model-grid units), native space"),
}


def desc_label(group: str, groups: Sequence[str]) -> str:
  """``wmh`` for a single group, else ``wmh`` + the group's letters and digits, capitalised."""
  if len(groups) == 1:
    return "wmh"
  letters = "".join(c for c in group if c.isalnum())
  return "wmh" + letters[:1].upper() + letters[1:]


def map_entities(map_name: str, desc: str, has_segmentation: bool) -> tuple[str, str, str]:
  """(desc label, suffix, description) of one of predict's maps of a group."""
  addition, suffix, description = MAP_NAMES[map_name]
  if map_name == "attention_mask" and not has_segmentation:
    addition = ""
  return desc + addition, suffix, description


def source_uri(name: bids.BidsName, image: Path) -> str:
  """``bids:raw:<path in the raw dataset>``, or the image's absolute path when it does
  not sit in a BIDS layout."""
  relative = name.folder() / "anat" / image.name
  root = raw_root(name, image)
  return f"bids:raw:{relative.as_posix()}" if root is not None else os.path.abspath(image)


def raw_root(name: bids.BidsName, image: Path) -> Path | None:
  """The BIDS dataset folder of ``image`` (``root/sub-X[/ses-Y]/anat/<file>``), else None."""
  image = Path(os.path.abspath(image))
  depth = len(name.folder().parts) + 1
  root = image.parents[depth] if len(image.parents) > depth else None
  return root if root is not None and image.parent == root / name.folder() / "anat" else None


def _link_or_copy(source: Path, target: Path) -> None:
  """``target`` becomes a hard link to ``source`` (a copy across file systems), atomically."""
  if target.exists() and os.path.samefile(source, target):
    return  # already linked (a rename onto the same file would leave the temp link behind)
  with fileio.atomic_path(target, suffix=".nii.gz") as tmp:
    tmp.unlink()
    try:
      os.link(source, tmp)
    except OSError:
      shutil.copyfile(source, tmp)


def export_scan(out: Path, name: bids.BidsName, image: Path, folder: Path, files: Sequence[str],
                groups: Sequence[str]) -> list[str]:
  """Links one scan's maps into the derivative dataset, with JSON sidecars.

  Args:
    out: the derivative dataset folder.
    name: the scan's parsed BIDS name.
    image: the scan's input image.
    folder: predict's output folder of the scan, holding ``<group>_<map>.nii.gz``.
    files: the names predict wrote there.
    groups: the model groups, in predict's order.

  Returns:
    The written map paths, relative to ``out``.
  """
  target_dir = out / name.folder() / "anat"
  stem = name.stem({**name.source_entities(), "space": "orig"})
  source = source_uri(name, image)
  written = []
  for group in groups:
    has_segmentation = f"{group}_mask.nii.gz" in files
    for map_name in MAP_NAMES:
      produced = f"{group}_{map_name}.nii.gz"
      if produced not in files:
        continue
      desc, suffix, description = map_entities(map_name, desc_label(group, groups),
                                               has_segmentation)
      target = target_dir / f"{stem}_desc-{desc}_{suffix}.nii.gz"
      _link_or_copy(folder / produced, target)
      fileio.atomic_write_text(target.with_name(target.name[:-len(".nii.gz")] + ".json"),
                               json.dumps({"Description": f"{description} (model group "
                                                          f"{group!r})",
                                           "Sources": [source]}, indent=2))
      written.append(target.relative_to(out).as_posix())
  return written


def write_description(out: Path, command: str, raw: Path | None) -> None:
  """``dataset_description.json`` of the derivative dataset.

  Args:
    command: the command line that produced it.
    raw: the source BIDS dataset (``DatasetLinks.raw``), None when unknown.
  """
  description: dict[str, Any] = {
      "Name": "wmh-jax white matter hyperintensity predictions",
      "BIDSVersion": BIDS_VERSION,
      "DatasetType": "derivative",
      "GeneratedBy": [{"Name": "wmh-jax", "Version": __version__,
                       "Description": f"command: {command}"}],
  }
  if raw is not None:
    description["DatasetLinks"] = {"raw": Path(os.path.abspath(raw)).as_uri()}
  fileio.atomic_write_text(out / "dataset_description.json", json.dumps(description, indent=2))


def write_volumes(out: Path, columns: Sequence[str], rows: Sequence[Mapping[str, Any]],
                  names: Sequence[bids.BidsName | None]) -> None:
  """``volumes.tsv`` (one row per scan, ``n/a`` for empty) and its ``volumes.json``.

  Args:
    columns: predict's volumes.csv columns.
    rows: predict's rows.
    names: each row's parsed BIDS name; rows whose name is None are left out.
  """
  header = ["participant_id", "session_id", *columns]
  lines = ["\t".join(header)]
  for row, name in zip(rows, names, strict=True):
    if name is None:
      continue
    values = {**row, "participant_id": name.subject, "session_id": name.session or ""}
    lines.append("\t".join(_tsv_cell(values.get(c)) for c in header))
  fileio.atomic_write_text(out / "volumes.tsv", "\n".join(lines) + "\n")
  fileio.atomic_write_text(out / "volumes.json", json.dumps(
      {c: _column_description(c) for c in header}, indent=2))


def _tsv_cell(value: Any) -> str:
  """A TSV cell: ``n/a`` for empty or None, floats in full precision, no tabs or newlines."""
  if value is None or value == "":
    return "n/a"
  text = repr(value) if isinstance(value, float) else str(value)
  return text.replace("\t", " ").replace("\n", " ")


def _column_description(column: str) -> dict[str, str]:
  """BIDS column metadata: a description, and ``Units`` for volumes."""
  if column == "participant_id":
    return {"Description": "BIDS subject label"}
  if column == "session_id":
    return {"Description": "BIDS session label (n/a without sessions)"}
  if column.endswith("_ml"):
    return {"Description": "volume in mL (wmh-jax README, 'Prediction on new scans')",
            "Units": "mL"}
  return {"Description": "see wmh-jax README, 'Prediction on new scans'"}

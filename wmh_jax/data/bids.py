"""BIDS datasets in: a strict reader of the file-name entity grammar, and manifest rows.

A BIDS file name is ``<key>-<value>[_<key>-<value>...]_<suffix><extension>``
(BIDS 1.10, "Entities"): keys from :data:`ENTITY_ORDER`, each at most once and
in that order; a *label* value is alphanumeric, an *index* value
(:data:`INDEX_ENTITIES`) is a non-negative integer; ``sub`` comes first. A
FLAIR image of subject X, session Y is ``sub-X/ses-Y/anat/sub-X_ses-Y[_...]_FLAIR.nii.gz``
(the session level is optional).

:func:`from_bids` turns a dataset into manifest rows (``subject_id`` =
``sub-X``, ``scan_id`` = the name's entities, e.g. ``sub-X_ses-Y_run-2``),
with masks from a derivatives folder when one is given and the columns of
``participants.tsv`` (age, sex, site...) joined by subject. A file that breaks
the grammar, sits in the wrong folder, or is missing (a dangling symbolic link,
as a DataLad dataset whose content was never fetched leaves) is one line in
the returned problems, and the other scans go on. pybids was weighed and not
used: it pulls in pandas, SQLAlchemy and formulaic for what is a file-name
grammar (BUILD_NOTES).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any

from wmh_jax.errors import InputError, ManifestError

# Entity keys in the order BIDS prescribes (BIDS 1.10 appendix "Entity table").
ENTITY_ORDER = ("sub", "ses", "sample", "task", "tracksys", "acq", "nuc", "voi", "ce", "trc",
                "stain", "rec", "dir", "run", "mod", "echo", "flip", "inv", "mt", "part", "proc",
                "hemi", "space", "split", "recording", "chunk", "seg", "res", "den", "label",
                "desc")
# Entities whose value is an index (digits), not a label (alphanumeric).
INDEX_ENTITIES = frozenset({"run", "echo", "flip", "inv", "split", "chunk"})
# Entities that tell derivatives of one source image apart; the rest identify the source.
DERIVATIVE_ENTITIES = frozenset({"space", "res", "den", "label", "desc", "seg", "hemi"})
EXTENSIONS = (".nii.gz", ".nii")
_LABEL = re.compile(r"[A-Za-z0-9]+")
_INDEX = re.compile(r"[0-9]+")
_SUFFIX = re.compile(r"[A-Za-z0-9]+")


@dataclasses.dataclass(frozen=True)
class BidsName:
  """A parsed BIDS file name.

  Attributes:
    entities: key -> value, in :data:`ENTITY_ORDER`.
    suffix: e.g. ``FLAIR``, ``mask``.
    extension: ``.nii.gz`` or ``.nii``.
  """
  entities: dict[str, str]
  suffix: str
  extension: str

  @property
  def subject(self) -> str:
    """``sub-<label>``."""
    return f"sub-{self.entities['sub']}"

  @property
  def session(self) -> str | None:
    """``ses-<label>``, or None for a dataset without sessions."""
    return f"ses-{self.entities['ses']}" if "ses" in self.entities else None

  def source_entities(self) -> dict[str, str]:
    """The entities that identify the source image (no :data:`DERIVATIVE_ENTITIES`)."""
    return {k: v for k, v in self.entities.items() if k not in DERIVATIVE_ENTITIES}

  def stem(self, entities: dict[str, str] | None = None) -> str:
    """``key-value_...`` of ``entities`` (default: all of this name's), in BIDS order."""
    entities = self.entities if entities is None else entities
    return "_".join(f"{k}-{entities[k]}" for k in ENTITY_ORDER if k in entities)

  def folder(self) -> Path:
    """``sub-X[/ses-Y]``: where this name's data type folder lives."""
    return Path(self.subject, self.session) if self.session else Path(self.subject)


def parse_name(path: str | os.PathLike) -> BidsName:
  """Parses a BIDS NIfTI file name (the name only; the folder is not checked).

  Raises:
    InputError: naming the file and what breaks the grammar.
  """
  name = Path(path).name
  extension = next((e for e in EXTENSIONS if name.endswith(e)), None)
  if extension is None:
    raise InputError(path, f"not a BIDS NIfTI name: it must end in {' or '.join(EXTENSIONS)}")
  parts = name[:-len(extension)].split("_")
  suffix = parts.pop()
  if not _SUFFIX.fullmatch(suffix) or "-" in suffix:
    raise InputError(path, f"not a BIDS name: the suffix {suffix!r} must be alphanumeric "
                     "and come last (..._FLAIR.nii.gz)")
  entities: dict[str, str] = {}
  last = -1
  for part in parts:
    key, sep, value = part.partition("-")
    if not sep:
      raise InputError(path, f"not a BIDS name: {part!r} is not key-value")
    if key not in ENTITY_ORDER:
      raise InputError(path, f"not a BIDS name: unknown entity {key!r}")
    if key in entities:
      raise InputError(path, f"not a BIDS name: entity {key!r} appears twice")
    position = ENTITY_ORDER.index(key)
    if position < last:
      raise InputError(path, f"not a BIDS name: entity {key!r} is out of order "
                       f"(BIDS order: {', '.join(k for k in ENTITY_ORDER if k in entities or k == key)})")
    pattern = _INDEX if key in INDEX_ENTITIES else _LABEL
    if not pattern.fullmatch(value):
      kind = "digits" if key in INDEX_ENTITIES else "letters and digits"
      raise InputError(path, f"not a BIDS name: {key}-{value!r} must be {kind} only")
    entities[key] = value
    last = position
  if "sub" not in entities or next(iter(entities)) != "sub":
    raise InputError(path, "not a BIDS name: it must start with sub-<label>")
  return BidsName(entities, suffix, extension)


def _check_place(path: Path, name: BidsName, root: Path, datatype: str) -> None:
  """The file must sit in ``root/sub-X[/ses-Y]/<datatype>/``."""
  expected = root / name.folder() / datatype
  if path.parent != expected:
    raise InputError(path, f"in the wrong folder for its name: expected {expected}")


def _nifti_files(folder: Path) -> list[Path]:
  """NIfTI files (and dangling links to them) directly in ``folder``, sorted."""
  if not folder.is_dir():
    return []
  return sorted(p for p in folder.iterdir()
                if p.name.endswith(EXTENSIONS) and not p.name.startswith("."))


def _present(path: Path) -> None:
  """Raises InputError for a dangling link or a non-file."""
  if path.is_symlink() and not path.exists():
    raise InputError(path, "missing: a symbolic link to nothing (content not fetched? "
                     "`datalad get` it)")
  if not path.is_file():
    raise InputError(path, "missing or not a regular file")


def _read_participants(root: Path, problems: list[str]) -> dict[str, dict[str, str]]:
  """``participants.tsv`` rows by participant_id (``sub-X``); ``n/a`` cells become empty."""
  path = root / "participants.tsv"
  if not path.is_file():
    return {}
  with open(path, newline="", encoding="utf-8") as f:
    reader = csv.DictReader(f, delimiter="\t")
    if not reader.fieldnames or "participant_id" not in reader.fieldnames:
      problems.append(f"{path}: no participant_id column; participant columns not joined")
      return {}
    table = {}
    for row in reader:
      table[row["participant_id"]] = {k: ("" if v in (None, "n/a") else v)
                                      for k, v in row.items()
                                      if k != "participant_id" and k is not None}
    return table


def dataset_name(root: str | os.PathLike) -> str:
  """``Name`` of ``dataset_description.json``, else the root folder's name."""
  root = Path(root)
  try:
    name = json.loads((root / "dataset_description.json").read_text(encoding="utf-8"))["Name"]
  except (OSError, ValueError, KeyError, TypeError):
    return root.name
  return str(name) or root.name


def _masks_by_source(derivatives: Path, mask_desc: str, problems: list[str]
                     ) -> dict[tuple[str, ...], Path]:
  """Masks ``*_desc-<mask_desc>_mask.nii[.gz]`` under ``derivatives``, by source entities."""
  if not derivatives.is_dir():
    raise ManifestError(derivatives, "derivatives folder is not a directory")
  found: dict[tuple[str, ...], Path] = {}
  for path in sorted(derivatives.glob("sub-*/**/anat/*_mask.nii*")):
    try:
      name = parse_name(path)
      _check_place(path, name, derivatives, "anat")
    except InputError as err:
      problems.append(str(err))
      continue
    if name.suffix != "mask" or name.entities.get("desc") != mask_desc:
      continue
    key = tuple(sorted(name.source_entities().items()))
    if key in found:
      problems.append(f"{path}: a second mask for the same image (kept {found[key].name})")
      continue
    found[key] = path
  return found


def from_bids(root: str | os.PathLike, derivatives: str | os.PathLike | None = None,
              mask_desc: str = "wmh", suffix: str = "FLAIR"
              ) -> tuple[list[dict[str, Any]], list[str]]:
  """Manifest rows for the ``<suffix>`` images of a BIDS dataset.

  Args:
    root: the dataset folder (holding ``sub-*/``).
    derivatives: a derivatives dataset with the masks, or None for no masks.
    mask_desc: the masks' ``desc`` label (``sub-X[_ses-Y]..._desc-<mask_desc>_mask.nii.gz``).
    suffix: the image suffix to import.

  Returns:
    (rows, problems). Rows, sorted by path: ``subject_id`` ``sub-X``,
    ``scan_id`` the image's entities (``sub-X_ses-Y``), ``session``
    (``ses-Y`` or empty), absolute ``image`` and ``mask`` (None when absent),
    ``dataset`` (the dataset's name) and every ``participants.tsv`` column of
    the subject. Problems: one line per file that was skipped.

  Raises:
    ManifestError: the root is not a folder, or no image could be imported.
  """
  root = Path(os.path.abspath(root))
  if not root.is_dir():
    raise ManifestError(root, "BIDS root is not a directory")
  problems: list[str] = []
  masks = ({} if derivatives is None else
           _masks_by_source(Path(os.path.abspath(derivatives)), mask_desc, problems))
  participants = _read_participants(root, problems)
  name_of_dataset = dataset_name(root)
  rows = []
  for subject in sorted(p for p in root.glob("sub-*") if p.is_dir()):
    folders = [subject / "anat", *(s / "anat" for s in sorted(subject.glob("ses-*")))]
    images = [p for folder in folders for p in _nifti_files(folder)
              if p.name.endswith(tuple(f"_{suffix}{e}" for e in EXTENSIONS))]
    if not images:
      problems.append(f"{subject}: no *_{suffix}.nii[.gz] under anat/ or ses-*/anat/")
    for path in images:
      try:
        name = parse_name(path)
        _check_place(path, name, root, "anat")
        _present(path)
      except InputError as err:
        problems.append(str(err))
        continue
      mask = masks.get(tuple(sorted(name.source_entities().items())))
      if derivatives is not None and mask is None:
        problems.append(f"{path}: no desc-{mask_desc} mask in {derivatives}; imported without one")
      rows.append({**participants.get(name.subject, {}),
                   "subject_id": name.subject, "scan_id": name.stem(name.source_entities()),
                   "session": name.session or "", "image": str(path),
                   "mask": None if mask is None else str(mask), "dataset": name_of_dataset})
  if not (root / "dataset_description.json").is_file():
    problems.append(f"{root / 'dataset_description.json'}: missing (not a BIDS dataset root?); "
                    "importing anyway")
  if not rows:
    raise ManifestError(root, f"no usable sub-*/[ses-*/]anat/*_{suffix}.nii[.gz] found"
                        + (f" ({len(problems)} problem(s): {problems[0]})" if problems else ""))
  return rows, problems

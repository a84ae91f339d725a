"""Manifests: the CSV that lists a study's scans, their labels and splits.

Columns (header names are case-sensitive):

=================  ========  ==================================================
column             required  meaning
=================  ========  ==================================================
subject_id         yes       person; scans of one subject never straddle splits
scan_id            yes       unique per row
image              yes       FLAIR NIfTI; relative paths are relative to the
                             manifest's folder
mask               no        label NIfTI (0 background, 1 WMH, 2 other)
wmh_volume_ml      no        annotated WMH volume in mL (>= 0)
severity           no        integer 0-4
dataset, site      no        free text
split              no        train, val or test
ventricle_ml,      no        confounder volumes in mL (>= 0)
white_matter_ml,
csf_ml
=================  ========  ==================================================

Any other column is kept as text and written back unchanged. A row may have
neither ``mask`` nor ``wmh_volume_ml``: such rows describe scans to predict on
(inference manifests).

Command line::

  python -m wmh_jax.data.manifest import-challenge ROOT --out=manifest.csv [--seed=0]
  python -m wmh_jax.data.manifest import-glob --images='scans/*.nii.gz' \\
      [--masks='labels/*.nii.gz'] --out=manifest.csv [--seed=0]
  python -m wmh_jax.data.manifest import-bids ROOT [--derivatives=ROOT/derivatives/x] \\
      [--mask_desc=wmh] [--suffix=FLAIR] --out=manifest.csv [--seed=0]
  python -m wmh_jax.data.manifest validate manifest.csv
"""

from __future__ import annotations

import csv
import glob
import math
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from absl import flags

from wmh_jax.data import bids, nifti
from wmh_jax.errors import InputError, ManifestError
from wmh_jax.runtime import cli, fileio

REQUIRED = ("subject_id", "scan_id", "image")
# Confounder volumes (mL) of the paper's §2.4 regression.
CONFOUNDER_COLUMNS = ("ventricle_ml", "white_matter_ml", "csf_ml")
VOLUME_COLUMNS = ("wmh_volume_ml", *CONFOUNDER_COLUMNS)
COLUMNS = REQUIRED + ("mask", "wmh_volume_ml", "severity", "dataset", "site", "split",
                      *CONFOUNDER_COLUMNS)
PATH_COLUMNS = ("image", "mask")
SPLITS = ("train", "val", "test")
NUM_SEVERITY = 5


# ---------------------------------------------------------------------------
# Reading


def _parse_volume(value: str, where: dict) -> float:
  """A finite, non-negative volume in mL."""
  try:
    volume = float(value)
  except ValueError:
    raise ManifestError(reason=f"not a number: {value!r}", **where) from None
  if not math.isfinite(volume):
    raise ManifestError(reason=f"not a finite number: {value!r}", **where)
  if volume < 0:
    raise ManifestError(reason=f"negative volume: {value}", **where)
  return volume


def _parse_severity(value: str, where: dict) -> int:
  """An integer grade 0-4 ("2" or "2.0")."""
  try:
    grade = float(value)
  except ValueError:
    grade = math.nan
  if not (grade.is_integer() and 0 <= grade < NUM_SEVERITY):
    raise ManifestError(reason=f"severity must be an integer 0-{NUM_SEVERITY - 1}, "
                        f"got {value!r}", **where)
  return int(grade)


def _parse_split(value: str, where: dict) -> str:
  if value not in SPLITS:
    raise ManifestError(reason=f"split must be one of {', '.join(SPLITS)}, got {value!r}",
                        **where)
  return value


def _parse_path(value: str, folder: Path, where: dict) -> str:
  """Absolute path of an existing regular file; relative to the manifest folder."""
  path = Path(value).expanduser()
  path = Path(os.path.abspath(path if path.is_absolute() else folder / path))
  if not path.exists():
    raise ManifestError(reason=f"file not found: {path}", **where)
  if not path.is_file():
    raise ManifestError(reason=f"not a regular file: {path}", **where)
  return str(path)


def _parse_row(raw: dict[str, str], folder: Path, where: dict) -> dict[str, Any]:
  """Typed row: every canonical column (None when empty) plus extras as text."""
  row: dict[str, Any] = {column: None for column in COLUMNS}
  for column, value in raw.items():
    value = (value or "").strip()
    cell = dict(where, column=column)
    if column not in COLUMNS:
      row[column] = value
    elif not value:
      if column in REQUIRED:
        raise ManifestError(reason="required value is empty", **cell)
    elif column in PATH_COLUMNS:
      row[column] = _parse_path(value, folder, cell)
    elif column in VOLUME_COLUMNS:
      row[column] = _parse_volume(value, cell)
    elif column == "severity":
      row[column] = _parse_severity(value, cell)
    elif column == "split":
      row[column] = _parse_split(value, cell)
    else:
      row[column] = value
  return row


def _check_header(path: Path, header: Sequence[str] | None) -> None:
  if not header:
    raise ManifestError(path, "empty manifest (no header)")
  for column in header:
    if not column.strip():
      raise ManifestError(path, "a header column has no name")
    if header.count(column) > 1:
      raise ManifestError(path, "duplicate column", column=column)
  for column in REQUIRED:
    if column not in header:
      raise ManifestError(path, "missing required column", column=column)


def read_manifest(path: str | os.PathLike) -> list[dict[str, Any]]:
  """Reads and validates a manifest.

  Only cheap checks are made (files exist); images are not opened (see
  :func:`validate`).

  Returns:
    One dict per data row, in file order, with every canonical column: paths
    as absolute ``str``, volumes ``float``, ``severity`` ``int``, other text
    ``str``, and None where the cell is empty or the column absent. Extra
    columns are kept as text.

  Raises:
    ManifestError: naming the manifest, the 1-based data row and the column:
      missing file, no header, no rows, unnamed/duplicate/missing required
      column, a row longer than the header, an empty required value, a
      duplicate ``scan_id``, a non-numeric/non-finite/negative volume, a
      severity outside 0-4, a split other than train/val/test, an image or
      mask that is missing or not a regular file.
  """
  path = Path(path)
  if not path.is_file():
    raise ManifestError(path, "manifest file not found")
  with open(path, newline="", encoding="utf-8-sig") as f:
    reader = csv.DictReader(f)
    _check_header(path, reader.fieldnames)
    rows, seen = [], {}
    for number, raw in enumerate(reader, start=1):
      where = {"path": path, "row": number}
      if None in raw:
        raise ManifestError(reason="more fields than the header", **where)
      row = _parse_row(raw, path.parent, where)
      if row["scan_id"] in seen:
        raise ManifestError(reason=f"duplicate scan_id {row['scan_id']!r} "
                            f"(first in row {seen[row['scan_id']]})",
                            column="scan_id", **where)
      seen[row["scan_id"]] = number
      rows.append(row)
  if not rows:
    raise ManifestError(path, "empty manifest (no data rows)")
  return rows


# ---------------------------------------------------------------------------
# Writing


def _columns(rows: Sequence[dict]) -> list[str]:
  """Required columns, optional ones used by any row (canonical order), then
  extras in order of first appearance."""
  used = {k for row in rows for k, v in row.items() if v is not None and v != ""}
  extras = [k for row in rows for k in row if k not in COLUMNS]
  return ([c for c in COLUMNS if c in REQUIRED or c in used]
          + list(dict.fromkeys(extras)))


def _format(value: Any, column: str, folder: Path) -> str:
  """One CSV cell; paths inside ``folder`` become relative to it."""
  if value is None:
    return ""
  if column in PATH_COLUMNS and value != "":
    path = Path(os.path.abspath(Path(value).expanduser()))
    return path.relative_to(folder).as_posix() if path.is_relative_to(folder) else str(path)
  if isinstance(value, (float, np.floating)):
    return repr(float(value))
  if isinstance(value, np.integer):
    return str(int(value))
  return str(value)


def write_manifest(path: str | os.PathLike, rows: Sequence[dict[str, Any]]) -> None:
  """Writes ``rows`` atomically (temp file in the same folder, then rename).

  Columns: the required ones and any optional column used by a row, in
  canonical order, then extra columns in order of first appearance. Image and
  mask paths inside the manifest's folder are written relative to it (relative
  input paths are taken relative to the current directory), others absolute.
  Floats are written exactly (``repr``), None as an empty cell.
  """
  path = Path(path)
  folder = Path(os.path.abspath(path.parent))
  folder.mkdir(parents=True, exist_ok=True)
  columns = _columns(rows)
  with fileio.atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(columns)
    for row in rows:
      writer.writerow([_format(row.get(c), c, folder) for c in columns])


# ---------------------------------------------------------------------------
# Splits


def assign_splits(rows: Sequence[dict[str, Any]], seed: int,
                  fractions: Sequence[float] = (0.6, 0.2, 0.2)) -> list[dict[str, Any]]:
  """Seeded train/val/test split grouped by ``subject_id``.

  Rows that already have a split keep it; the other rows of such a subject
  join that subject's (first) split. Subjects without any split are shuffled
  (sorted ids, then ``numpy.random.default_rng(seed)``) and dealt out so that
  the share of their *rows* in each split follows ``fractions``: a subject
  goes to the split whose cumulative-fraction interval contains the midpoint
  of its rows. The result depends only on the rows' content and ``seed``.

  Returns:
    New row dicts (the input is not modified), in input order.
  """
  fractions = np.asarray(fractions, np.float64)
  if fractions.shape != (3,) or (fractions < 0).any() or abs(fractions.sum() - 1) > 1e-6:
    raise ValueError(f"fractions must be 3 non-negative numbers summing to 1: {fractions}")
  out = [dict(row) for row in rows]
  subject_split: dict[str, str] = {}
  counts: dict[str, int] = {}
  for row in out:
    subject = str(row["subject_id"])
    counts[subject] = counts.get(subject, 0) + 1
    if row.get("split"):
      subject_split.setdefault(subject, row["split"])
  free = sorted(s for s in counts if s not in subject_split)
  order = np.random.default_rng(seed).permutation(len(free))
  total = sum(counts[s] for s in free)
  bounds = np.cumsum(fractions)
  done = 0
  for i in order:
    subject = free[i]
    midpoint = (done + counts[subject] / 2) / total
    subject_split[subject] = SPLITS[min(int(np.searchsorted(bounds, midpoint)), 2)]
    done += counts[subject]
  for row in out:
    if not row.get("split"):
      row["split"] = subject_split[str(row["subject_id"])]
  return out


# ---------------------------------------------------------------------------
# Importers


def _stem(name: str) -> str:
  """File name without ``.nii.gz`` / ``.nii`` / last suffix."""
  for suffix in (".nii.gz", ".nii"):
    if name.endswith(suffix):
      return name[: -len(suffix)]
  return Path(name).stem


def _path_ids(paths: Sequence[str]) -> list[str]:
  """Short ids: the path components that differ between ``paths``, joined by
  ``_`` (file extension dropped); a single path gives its stem."""
  parts = [Path(p).parts[:-1] + (_stem(Path(p).name),) for p in paths]
  if len(parts) == 1:
    return [parts[0][-1]]
  n = min(len(p) for p in parts)
  head = 0
  while head < n - 1 and len({p[head] for p in parts}) == 1:
    head += 1
  tail = 0
  while tail < n - head - 1 and len({p[-1 - tail] for p in parts}) == 1:
    tail += 1
  return ["_".join(p[head:len(p) - tail]) for p in parts]


def _first_file(folder: Path, names: Sequence[str]) -> Path | None:
  """The first of ``folder / name`` that is a regular file, or None."""
  return next((folder / n for n in names if (folder / n).is_file()), None)


def _challenge_key(pre: Path) -> tuple[str, str]:
  """(site, id) sort key of a ``<site>/<id>/pre`` folder; ids are right-justified
  so that numeric ids sort numerically."""
  return pre.parent.parent.name, pre.parent.name.rjust(16)


def from_challenge_layout(root: str | os.PathLike,
                          dataset: str | None = None) -> list[dict[str, Any]]:
  """Rows for the WMH Segmentation Challenge layout.

  Layout: ``<root>/<site>/<id>/pre/FLAIR.nii.gz`` (or ``.nii``) with the labels
  in ``<root>/<site>/<id>/wmh.nii.gz`` (or ``.nii``; mask None when absent).

  Returns:
    Rows sorted by site then id, with ``subject_id = scan_id = f"{site}_{id}"``,
    absolute paths, ``site`` and ``dataset`` (``dataset`` argument, default the
    site name).
  """
  root = Path(os.path.abspath(root))
  if not root.is_dir():
    raise ManifestError(root, "challenge root is not a directory")
  rows = []
  for pre in sorted(root.glob("*/*/pre"), key=_challenge_key):
    flair = _first_file(pre, ("FLAIR.nii.gz", "FLAIR.nii"))
    if flair is None:
      continue
    mask = _first_file(pre.parent, ("wmh.nii.gz", "wmh.nii"))
    site = pre.parent.parent.name
    scan_id = f"{site}_{pre.parent.name}"
    rows.append({"subject_id": scan_id, "scan_id": scan_id, "image": str(flair),
                 "mask": None if mask is None else str(mask), "site": site,
                 "dataset": dataset or site})
  if not rows:
    raise ManifestError(root, "no <site>/<id>/pre/FLAIR.nii.gz found")
  return rows


def _glob_files(pattern: str) -> list[str]:
  files = sorted(os.path.abspath(p) for p in glob.glob(os.path.expanduser(pattern),
                                                       recursive=True))
  files = [p for p in files if os.path.isfile(p)]
  if not files:
    raise ManifestError(pattern, "no files match this pattern")
  return files


def from_globs(image_glob: str, mask_glob: str | None = None) -> list[dict[str, Any]]:
  """Rows for images (and masks) matched by glob patterns (``**`` recursive).

  ``scan_id = subject_id`` is the part of the image path that differs between
  images (e.g. ``sub-01`` for ``data/sub-01/anat/FLAIR.nii.gz``). Masks are
  paired with images by that id when the id sets agree, otherwise by sorted
  order.

  Raises:
    ManifestError: a pattern matches no file, image and mask counts differ,
      or two images get the same id.
  """
  images = _glob_files(image_glob)
  ids = _path_ids(images)
  if len(set(ids)) != len(ids):
    raise ManifestError(image_glob, "images do not have distinct names")
  masks: list[str | None] = [None] * len(images)
  if mask_glob is not None:
    found = _glob_files(mask_glob)
    if len(found) != len(images):
      raise ManifestError(mask_glob, f"{len(found)} masks for {len(images)} images "
                          f"({image_glob})")
    by_id = dict(zip(_path_ids(found), found))
    masks = [by_id[i] for i in ids] if set(by_id) == set(ids) else list(found)
  return [{"subject_id": i, "scan_id": i, "image": image, "mask": mask}
          for i, image, mask in zip(ids, images, masks)]


# ---------------------------------------------------------------------------
# Command line


def validate(path: str | os.PathLike) -> list[str]:
  """Reads a manifest and loads every image and mask through :mod:`nifti`.

  Returns:
    One error line per bad file (empty when all is well). A malformed
    manifest gives a single line.
  """
  try:
    rows = read_manifest(path)
  except ManifestError as e:
    return [str(e)]
  errors = []
  for row in rows:
    try:
      scan = nifti.load_image(row["image"])
    except InputError as e:
      errors.append(str(e))
      continue
    if row["mask"]:
      try:
        nifti.load_labels(row["mask"], scan)
      except InputError as e:
        errors.append(str(e))
  return errors


COMMANDS = {  # subcommand -> its positional argument
    "import-challenge": "ROOT", "import-glob": "", "import-bids": "ROOT", "validate": "MANIFEST"}
_USAGE = ("import-challenge ROOT --out=CSV [--dataset=NAME] | import-glob --images=GLOB "
          "[--masks=GLOB] --out=CSV | import-bids ROOT [--derivatives=DIR] [--mask_desc=wmh] "
          "[--suffix=FLAIR] --out=CSV | validate MANIFEST")


def define_flags(values: flags.FlagValues) -> None:
  """The command's flags (on its own ``FlagValues``: `runtime.cli.parse_command`)."""
  flags.DEFINE_string("out", None, "manifest CSV to write (import-*)", flag_values=values)
  flags.DEFINE_integer("seed", 0, "split seed (import-*)", flag_values=values)
  flags.DEFINE_string("dataset", None, "dataset column (import-challenge; default: site)",
                      flag_values=values)
  flags.DEFINE_string("images", None, "glob of the images (import-glob)", flag_values=values)
  flags.DEFINE_string("masks", None, "glob of the masks (import-glob)", flag_values=values)
  flags.DEFINE_string("derivatives", None, "derivatives dataset holding the masks "
                      "(import-bids; default: no masks)", flag_values=values)
  flags.DEFINE_string("mask_desc", "wmh", "desc label of the masks: "
                      "*_desc-<mask_desc>_mask.nii.gz (import-bids)", flag_values=values)
  flags.DEFINE_string("suffix", "FLAIR", "image suffix to import (import-bids)",
                      flag_values=values)


def _usage_error(message: str) -> int:
  print(f"usage: python -m wmh_jax.data.manifest {_USAGE}\nerror: {message}", file=sys.stderr)
  return 2


def main(argv: Sequence[str] | None = None) -> int:
  """CLI entry; returns the exit status (0 ok, 1 bad input, 2 usage error)."""
  args, positional = cli.parse_command("python -m wmh_jax.data.manifest",
                                       "Create and check wmh-jax manifests.", define_flags, argv,
                                       arguments=_USAGE)
  command, operands = (positional[0], positional[1:]) if positional else (None, [])
  if command not in COMMANDS:
    return _usage_error(f"expected a command among {', '.join(COMMANDS)}, got {command!r}")
  if len(operands) != bool(COMMANDS[command]):
    return _usage_error(f"{command} takes {COMMANDS[command] or 'no argument'}, got {operands}")
  if command == "validate":
    errors = validate(operands[0])
    for line in errors:
      print(line)
    print(f"{operands[0]}: {len(errors)} problem(s)", file=sys.stderr)
    return 1 if errors else 0
  if args.out is None:
    return _usage_error(f"{command} needs --out")
  problems: list[str] = []
  try:
    if command == "import-challenge":
      rows = from_challenge_layout(operands[0], args.dataset)
    elif command == "import-bids":
      rows, problems = bids.from_bids(operands[0], args.derivatives, args.mask_desc, args.suffix)
    elif args.images is None:
      return _usage_error("import-glob needs --images")
    else:
      rows = from_globs(args.images, args.masks)
  except ManifestError as e:
    print(e, file=sys.stderr)
    return 1
  for line in problems:
    print(line, file=sys.stderr)
  write_manifest(args.out, assign_splits(rows, args.seed))
  print(f"wrote {len(rows)} rows to {args.out}"
        + (f"; {len(problems)} file(s) skipped or without a mask (listed above)"
           if problems else ""))
  return 0


if __name__ == "__main__":
  sys.exit(main())

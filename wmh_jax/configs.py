"""The base configuration of every experiment (paper §2.2–2.3), and its variants.

:func:`get_config` holds every field once, with the paper section it follows
or the reason it deviates. It is the strong experiment's recipe as it is; the
files in ``experiments/`` import it and set only what differs from it (the
model kind, and for the weak network its normalisation and learning rate),
each with the reason. Every config
file takes an argument of comma-separated flags
(``--config=experiments/weak.py:cpu``, ``:paper``, ``:cpu,paper``):

* ``cpu`` shrinks grid, network and cohort so that a run fits on a 2-core CPU;
  every field it changes is listed in ``config.cpu_variant_changes``.
* ``paper`` restores the paper-exact recipe: every field where the default
  recipe deviates from the paper (all listed in :data:`PAPER_RECIPE` and, when
  the flag is given, in ``config.paper_recipe_changes``) takes the paper's
  value. The deviations exist because the paper recipe does not learn at a
  CPU budget; BUILD_NOTES.md measures both side by side.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from collections.abc import Collection
from pathlib import Path

import ml_collections

from wmh_jax.errors import WMHError

FLAGS = ("cpu", "paper", "domain")

# The paper's value of every recipe field where the default deviates from it.
PAPER_RECIPE = {
    "data.percentiles": (1.0, 99.0),       # paper §2.3; clips ~45 % of lesion voxels to 1.0
    "model.norm": "none",                  # paper: no normalisation layers
    "model.pooled_norm": "none",           # paper: Dense on the raw global average
    "model.pool_scale": 1.0,               # paper: plain average
    "model.zero_init_volume_head": False,  # paper: Keras default (Glorot) Dense init
    "model.seg_prior_init": False,         # paper: Keras default bias 0 (p = 0.5)
    "loss.seg": "dice",                    # paper: soft Dice only
    "loss.dice_reduction": "scan",         # Dice per scan, averaged over the batch
    "train.optimizer": "adadelta",         # paper §2.3: Adadelta, Keras-2 values
    "train.learning_rate": 1.0,
    "train.warmup_steps": 0,
    "train.schedule": "constant",
    "model.volume_head": "gap",            # paper §2.2: global average pool + Dense
    "train.refit_head": "none",            # paper: the Dense layer is trained by the optimiser
    "model.readout": "head",               # paper: the volume head's Dense layer
}


def get_config(arg: str | None = None, recipe: dict | None = None) -> ml_collections.ConfigDict:
  """Returns the paper-scale base configuration with the default recipe.

  The recipe (no normalisation layers, Adam 1e-3, Dice + BCE) is the one the
  strong experiment uses unchanged; ``model.kind`` is "weak" only so that a
  bare base config builds a GP-Unet. Paper: O. Werner et al., weak vs strong
  labels for WMH volume (cited in README.md).

  Args:
    arg: comma-separated flags (:data:`FLAGS`).
    recipe: per-experiment recipe values (``{"model.norm": "group"}``), set
      before the flags so that ``paper`` still restores every paper value.
  """
  config = ml_collections.ConfigDict()
  config.seed = 0  # §2.3: runs differ only in the seed; `--seeds=0,1,2` sweeps three

  # ---- model ---------------------------------------------------------------
  config.model = ml_collections.ConfigDict()
  config.model.kind = "weak"           # weak | strong | joint | severity
  config.model.base_filters = 32       # Dubost's GP-Unet code (the paper gives no width)
  config.model.depth = 2               # §2.2 Fig. 1: a shallow U-Net, two 2x down-samplings
  config.model.conv_impl = "auto"      # auto | native | depth2d  (auto: depth2d_concat on CPU)
  # Compute dtype of the body: float32 | bfloat16. Parameters, optimizer state, running
  # statistics, losses and every reduction stay float32 (models.py, "Mixed precision").
  config.model.dtype = "float32"
  config.model.norm = "none"           # §2.2: none | group | instance, after every body conv
  # §2.2 GP head: global average pooling + Dense(1). Deviation (paper: plain average, Keras
  # Glorot Dense): the raw pooled features share a large offset, so the Dense layer cannot
  # spread its predictions. They are standardised with running statistics (kept in the
  # checkpoint), scaled to O(1) Dense weights, and the head starts at the mean training
  # volume (BUILD_NOTES, "Making the networks learn").
  config.model.pool_scale = 38.0       # global average pool multiplier (1.0 = paper)
  config.model.pooled_norm = "running"  # none | running: standardise pooled features
  config.model.pooled_norm_momentum = 0.99  # EMA decay; 0.9 made the last epochs drift
  config.model.zero_init_volume_head = True  # Dense kernel init 0 (bias = mean target)
  # §2.2 strong head: 1x1x1 conv + sigmoid, "thresholded at 0.5". Deviation (paper: Keras
  # bias 0, p = 0.5 everywhere): the bias starts at the logit of the training lesion
  # fraction, so there is no early flood of 0.5.
  config.model.seg_prior_init = True
  config.model.num_severity_classes = 5  # severity: quintiles of the training domain's volumes
  # Volume head of weak and joint: "gap" (paper §2.2: global average pool + Dense) or
  # "count" (voxel lesion fractions summed over the brain, models.architectures.CountHead).
  config.model.volume_head = "gap"
  config.model.count_hidden = 16       # count head: hidden 1x1x1 channels (0: none)
  # What the closed-form refit (train.refit_head) fits and inference uses, for weak and joint:
  # "head" (the volume head's own Dense input) or "counts" (fixed random 1x1x1 ReLU features
  # of the body summed over the brain: a counting readout,
  # models.architectures.CountReadout; not in the paper). Training is the same under both.
  config.model.readout = "head"
  config.model.readout_hidden = 256    # counts readout: random ReLU channels

  # ---- data ----------------------------------------------------------------
  config.data = ml_collections.ConfigDict()
  config.data.manifest = ""            # CSV; empty = built-in synthetic cohort
  config.data.external_manifests = ""  # comma-separated CSVs evaluated by analysis
  config.data.cohort_dir = ""          # empty = ~/.cache/wmh_jax/cohort
  config.data.cohort_n_local = 400
  config.data.cohort_seed = 0
  config.data.cache_dir = ""           # empty = ~/.cache/wmh_jax/preprocessed
  # §2.3 "batches of four full brain images of 112 x 128 x 32 voxels", resampled from the
  # local scans' grid.
  config.data.shape = (112, 128, 32)
  config.data.spacing_mm = (1.4, 1.4, 4.2)
  # §2.3 "percentile normalized (1% and 99%) between 0 and 1". Deviation: 99.9; the 99 %
  # clip maps ~45 % of lesion voxels to 1.0 together with the brightest grey matter, and
  # 99.9 triples an oracle's Dice (BUILD_NOTES visibility table).
  config.data.percentiles = (1.0, 99.9)
  # §2.3 "randomly split in a train (60%), a validation (20%), and a test (20%) set":
  # wmh_jax.data.manifest.assign_splits, by subject, seeded here.
  config.data.split_seed = 0
  config.data.volume_scale_ml = 10.0   # regression target = volume_ml / volume_scale_ml

  # ---- augmentation (host, Grain) -------------------------------------------
  # §2.3 "translation (uniform sampled between ±0.2 of the dimension length), rotation
  # (±54 degrees), and flipping", on the fly.
  config.augment = ml_collections.ConfigDict()
  config.augment.enabled = True
  config.augment.translate_fraction = 0.2   # uniform ±0.2 of each axis length
  config.augment.rotate_deg = 54.0          # in-plane (about z), uniform ±54°
  config.augment.flip_axes = (0,)           # left-right flip with p=0.5
  # Resample on the accelerator inside the train step (data/device_augment.py); the host
  # still draws every matrix. For hosts whose cores cannot feed their devices.
  config.augment.on_device = False
  # Domain randomisation (issue 15, wmh_jax/data/domain.py): a random scanner
  # per sample, image only (mask and volume label unchanged). Independent of
  # ``augment.enabled``, which switches the geometric part.
  config.augment.domain = ml_collections.ConfigDict()
  domain = config.augment.domain
  domain.enabled = False            # off until its effect on the external domains is measured
  domain.probability = 0.8          # each of contrast, bias, resolution, noise applied with p
  domain.gamma = (0.6, 1.65)        # log-uniform, exp(±0.5); SynthSeg: log-gamma std 0.4–0.5
  domain.contrast_knots = 4         # interior knots of the random monotone curve (5 segments)
  domain.contrast_slope = (0.5, 2.0)  # log-uniform slope per segment: up to 4x between two
  domain.bias_log_std = (0.0, 0.5)  # std of the log field; SynthSeg codes: bias_field_std 0.3–0.7
  domain.bias_order = 3             # DCT frequencies 0..3 per axis (SPM's smooth bias model)
  domain.inplane_resolution_mm = (1.0, 2.0)  # clinical FLAIR; no-op where x/y spacing >= it
  domain.slice_thickness_mm = (3.0, 8.0)     # clinical 2D FLAIR; no-op where z spacing >= it
  domain.noise_std = (0.0, 0.08)    # of the [0,1] range: 0.08 = SNR ~6 at white matter (~0.5)
  domain.rician_probability = 0.5   # magnitude (Rician) noise, else Gaussian
  domain.low_percentile = (0.0, 2.0)  # re-normalisation: brain percentile -> 0 (paper/default 1)
  domain.high_percentile = (97.0, 100.0)  # -> 1 (paper 99, default 99.9); 97 saturates lesions

  # ---- input pipeline ---------------------------------------------------------
  config.loader = ml_collections.ConfigDict()
  # Grain worker processes: -1 = the host's cores left after the main process
  # (pipeline.worker_count), 0 = augment in the main process.
  config.loader.worker_count = -1
  config.loader.worker_buffer_size = 2

  # ---- losses -----------------------------------------------------------------
  # §2.2 strong: "optimized using the Dice coefficient"; weak: MSE on the volume. Deviation:
  # Dice + BCE on logits (nnU-Net), the Dice summed over the global batch; per-scan soft
  # Dice makes an empty prediction score better on small-lesion scans and collapsed every
  # CPU run to predicting nothing (BUILD_NOTES).
  config.loss = ml_collections.ConfigDict()
  config.loss.seg = "dice_bce"         # dice (paper) | dice_bce (nnU-Net default)
  config.loss.dice_eps = 1.0           # soft-Dice smoothing, voxels
  config.loss.dice_reduction = "batch"  # scan (paper) | batch: sums over the global batch
  config.loss.bce_weight = 1.0         # dice_bce: Dice + bce_weight * BCE
  config.loss.bce_pos_weight = 1.0     # weight of lesion voxels in the BCE

  # ---- optimisation -----------------------------------------------------------
  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 4          # global batch, paper §2.3
  config.train.num_epochs = 50         # not in the paper; `:cpu` trains 12
  # §2.3 "Adadelta was used for optimization" (Keras 2: lr 1.0, rho 0.95, eps 1e-7) is
  # `:paper`. Deviation: Adam 1e-3, 20 warm-up steps, cosine to 0; with Adadelta the
  # strong net collapsed to an empty prediction from epoch 4, and the weak net reached a
  # validation ICC of 0.005 in 720 CPU steps (BUILD_NOTES).
  config.train.optimizer = "adam"      # adam | adadelta (Keras-2: lr 1.0, rho 0.95, eps 1e-7)
  config.train.learning_rate = 1e-3
  config.train.rho = 0.95              # Adadelta (`:paper`)
  config.train.eps = 1e-7              # Adadelta (`:paper`)
  config.train.warmup_steps = 20       # linear warm-up from 0
  # Volume head's Dense layer fitted in closed form (ridge, penalty by leave-one-out) on
  # the training scans' pooled features, for inference only (wmh_jax/training/refit.py): "none" |
  # "end" (after the last step) | "epoch" (every epoch end). Weak and joint only; where a
  # fit is made, the trained Dense layer's validation is logged too, as trained_head_val_*.
  # Deviation (paper: the Dense layer as trained): weak validation ICC 0.84 vs 0.74 for
  # the trained layer at 720 `:cpu` steps (BUILD_NOTES, issue 19).
  config.train.refit_head = "epoch"
  config.train.schedule = "cosine"     # constant | cosine (to 0 at the last step)
  config.train.joint_dice_weight = 1.0  # joint: MSE + weight * segmentation loss; not tuned
  config.train.log_every_steps = 10    # steps between metric fetches (the host-device syncs)
  config.train.prefetch_batches = 2    # global batches placed on the devices ahead of the step
  config.train.checkpoint_keep = 3

  config.cpu_variant_changes = ()
  config.paper_recipe_changes = ()
  _set(config, recipe or {})
  return apply_flags(config, arg)


# Fields that change how a run executes, not what it computes (the worker
# count is tested not to change batches; metric fetches and prefetching do not
# change the arithmetic).
RUNTIME_FIELDS = ("train.log_every_steps", "train.prefetch_batches", "train.checkpoint_keep",
                  "loader.worker_count", "loader.worker_buffer_size")
# Fields a resumed run may set anew: how many epochs it trains (a run may be extended).
EXTENSIBLE_FIELDS = ("train.num_epochs",)
# Fields added after runs had been trained without them, whose absence meant another
# recipe than today's default (other segmentation head and pooling): such a run cannot
# be rebuilt.
RECIPE_FIELDS = ("model.norm", "model.pooled_norm", "model.pooled_norm_momentum",
                 "model.seg_prior_init")
_ABSENT = "<absent: trained by an older wmh-jax>"


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """``"experiments/weak.py:cpu"`` → that file's ``get_config("cpu")``.

  Raises:
    WMHError: the file does not exist, has no ``get_config`` or rejects ``arg``.
  """
  path, sep, arg = spec.rpartition(":")
  if not sep or not path.endswith(".py"):
    path, arg = spec, ""
  file = Path(path)
  if not file.is_file():
    raise WMHError(file, "experiment config file not found")
  module_spec = importlib.util.spec_from_file_location(f"wmh_jax_experiment_{file.stem}", file)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise WMHError(file, "has no get_config(arg) function")
  try:
    return module.get_config(arg or None)
  except ValueError as err:  # e.g. an unknown ":arg"
    raise WMHError(file, str(err)) from None


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
  """``{"a": {"b": 1}}`` → ``{"a.b": 1}``."""
  flat: dict[str, object] = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def run_identity(config: dict | ml_collections.ConfigDict) -> dict[str, str]:
  """What a run computes, as dotted fields: the one rule behind every "is it the same run?".

  Resume (`runtime.checkpoint`), the study's skip of finished runs
  (`study.sweep`), the restore check of old checkpoints and the compile cache of
  `training.train` all compare these. Every field but :data:`RUNTIME_FIELDS`;
  a field missing from ``config`` (written by an older wmh-jax) has
  :func:`get_config`'s default, the behaviour of the code that wrote it, except
  :data:`RECIPE_FIELDS`, which are marked absent: that code behaved otherwise,
  so no config of today matches. Values are JSON text, so (16, 16, 8) and
  [16, 16, 8] are the same value and 1 and 1.0 are not.

  Args:
    config: a config, or its plain JSON dict (a checkpoint's stored config).
  """
  plain = json.loads(config.to_json()) if isinstance(config, ml_collections.ConfigDict) else config
  flat = {**_default_fields(), **flatten(plain)}
  for key in RECIPE_FIELDS:
    if key not in flatten(plain):
      flat[key] = _ABSENT
  return {key: json.dumps(value) for key, value in flat.items() if key not in RUNTIME_FIELDS}


def changed_fields(stored: dict | ml_collections.ConfigDict,
                   wanted: dict | ml_collections.ConfigDict,
                   ignore: Collection[str] = ()) -> list[str]:
  """Dotted fields, sorted, in which the runs of two configs differ (:func:`run_identity`).

  Fields only ``stored`` has (removed since: they no longer select anything)
  and the fields in ``ignore`` are left out.
  """
  old, new = run_identity(stored), run_identity(wanted)
  return [key for key in sorted(new) if key not in ignore and old.get(key) != new[key]]


def missing_recipe_fields(stored: dict) -> list[str]:
  """:data:`RECIPE_FIELDS` that a stored config (plain JSON) lacks: its run cannot be rebuilt."""
  present = flatten(stored)
  return [key for key in RECIPE_FIELDS if key not in present]


@functools.cache
def _default_fields() -> dict[str, object]:
  return flatten(json.loads(get_config().to_json()))


def apply_flags(config: ml_collections.ConfigDict, arg: str | None
                ) -> ml_collections.ConfigDict:
  """Applies the config-file argument to ``config`` (in place) and returns it.

  ``paper`` first (:func:`apply_paper_recipe`), then ``cpu``
  (:func:`apply_cpu_variant`), so ``:cpu,paper`` is the paper recipe at CPU size;
  ``domain`` turns on domain-randomised augmentation (``augment.domain``).
  Experiment files set their recipe, then call this last.

  Raises:
    ValueError: an unknown flag.
  """
  flags = parse_flags(arg)
  if "paper" in flags:
    apply_paper_recipe(config)
  if "cpu" in flags:
    apply_cpu_variant(config)
  if "domain" in flags:
    config.augment.domain.enabled = True
  return config


def parse_flags(arg: str | None) -> set[str]:
  """``"cpu,paper"`` -> {"cpu", "paper"}; raises ValueError for an unknown flag."""
  flags = {f.strip() for f in (arg or "").split(",") if f.strip()}
  unknown = flags - set(FLAGS)
  if unknown:
    raise ValueError(f"unknown config argument(s) {sorted(unknown)}; use a comma-separated "
                     f"subset of {FLAGS}, e.g. ':cpu' or ':cpu,paper'")
  return flags


def _set(config: ml_collections.ConfigDict, changes: dict) -> tuple[str, ...]:
  for dotted, value in changes.items():
    section, field = dotted.split(".")
    config[section][field] = value
  return tuple(sorted(changes))


def apply_paper_recipe(config: ml_collections.ConfigDict) -> None:
  """Sets every recipe field to the paper's value; records them in ``paper_recipe_changes``."""
  config.paper_recipe_changes = _set(config, PAPER_RECIPE)


def apply_cpu_variant(config: ml_collections.ConfigDict) -> None:
  """Shrinks the run to fit a 2-core CPU; records each changed field.

  Grid and network are 8x and 16x smaller than the paper's; 400 local scans
  (240 for training); 12 epochs of 60 steps. Augmentation keeps only the
  left-right flip: at this budget the ±20 % shifts and ±54° rotations make
  every training image unlike the unaugmented validation images, and the weak
  network's validation ICC(2,1) after 216 steps was 0.26 with them and 0.49
  without (BUILD_NOTES, "Making the networks learn"). The loss and
  optimiser recipe is not changed here (``:paper`` does that).
  """
  config.cpu_variant_changes = _set(config, {
      "data.shape": (56, 64, 16),
      "data.spacing_mm": (2.8, 2.8, 8.4),
      "data.cohort_n_local": 400,
      "model.base_filters": 8,
      "augment.rotate_deg": 0.0,
      "augment.translate_fraction": 0.0,
      "train.num_epochs": 12,
  })

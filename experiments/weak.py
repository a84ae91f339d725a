"""GP-Unet trained on per-scan WMH volume only ("weak labels"), paper §2.2–2.3.

  python -m wmh_jax.main --config=experiments/weak.py:cpu --workdir=runs/weak

Wall time: `:cpu` about 10–12 min on 2 CPU cores including the cohort (720
steps at ~0.5 s); paper scale: ~2 min per step on 2 CPU cores, a GPU job.
Arguments (comma-separated): `cpu` (56x64x16 grid at 2.8x2.8x8.4 mm, 8 base
filters, 240 local scans, 20 epochs, no augmentation), `paper` (the
paper-exact recipe, `configs.PAPER_RECIPE`), e.g. `:cpu,paper`.

What each value is, next to the paper (configs.py holds the shared defaults):

| field | value | source |
|---|---|---|
| model.kind | weak: global pooling + Dense(1), MSE on volume | §2.2 "Regression Network" |
| model.depth / base_filters | 2 poolings / 32 | §2.2 Fig. 1 ("shallow"); Dubost's GP-Unet code |
| data.shape / spacing_mm | 112x128x32 / 1.4x1.4x4.2 mm | §2.3 "112 × 128 × 32 voxels" |
| data.percentiles | (1, 99.9) — paper (1, 99) | §2.3; the 99 % clip saturates ~45 % of lesion voxels at the CPU grid |
| train.batch_size | 4 | §2.3 "Batches of four" |
| train.optimizer | Adam 1e-3, 20 warm-up steps, cosine — paper Adadelta | §2.3; Adadelta's first steps are ~3e-4 |
| augment | shift ±0.2, rotation ±54°, flip | §2.3 |
| data split | 60/20/20 by subject | §2.3 |
| seeds | 0, 1, 2 (`--seeds=0,1,2`) | §2.3 "repeated three times" |
| model.pooled_norm | running standardisation of pooled features — not in paper | the raw pooled features share a large offset: no spread |
| model.zero_init_volume_head / pool_scale | True / 38 — paper False / 1 | start at the mean volume; O(1) Dense weights |
| model.norm / train.learning_rate | group / 3e-3 — paper none / Adadelta | measured: validation ICC 0.73 vs 0.70 over epochs 6–12 (BUILD_NOTES) |
"""

from wmh_jax import configs

# Chosen per kind by measurement (BUILD_NOTES, "Making the networks learn");
# `:paper` sets both back.
RECIPE = {"model.norm": "group", "train.learning_rate": 3e-3}


def get_config(arg=None):
  config = configs.get_config(arg, recipe=RECIPE)
  config.model.kind = "weak"
  return config

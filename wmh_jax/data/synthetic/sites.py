"""The cohort's domains and their scanners (paper §2.1: one training domain, four external ones).

``local`` (training domain, like the Rotterdam Scan Study: 1.5 T, vascular WMH)
and four external test domains like the public challenges: ``wmhseg`` (60 scans,
vascular, 3 T, three sites, label 2 "other pathology"), ``longmsles`` (21 scans,
MS, 4-5 scans per subject), ``msseg`` (15 scans, MS, 1.5 T and 3 T sites) and
``msles`` (15 scans, MS, masks drawn one voxel wider in-plane: another
annotation style).
"""

from __future__ import annotations

import dataclasses


from wmh_jax.data import manifest


# ---------------------------------------------------------------------------
# Domains


@dataclasses.dataclass(frozen=True)
class Site:
  """One scanner: acquisition grid and image appearance.

  Attributes:
    name: site name written to the manifest.
    field_strength_t: 1.5 or 3.0 (selects the FLAIR contrast).
    spacing_mm: stored voxel size (x, y, z) in mm; z is the slice axis.
    gain: scanner units of normal-appearing white matter.
    noise: Rician noise sigma relative to white matter.
    bias: bias-field amplitude (standard deviation of the log field).
    orientation: "RAS" or "LAS" (x axis stored right-to-left).
    dtype: stored image type, "float32" or "uint8" (clipped to 0-255).
  """
  name: str
  field_strength_t: float
  spacing_mm: tuple[float, float, float]
  gain: float
  noise: float
  bias: float
  orientation: str = "RAS"
  dtype: str = "float32"


@dataclasses.dataclass(frozen=True)
class Domain:
  """One data set of the cohort.

  Attributes:
    name: domain name (manifest ``dataset`` column and folder name).
    n_scans: number of scans.
    lesion_type: "vascular" or "ms".
    sites: scanners; scan ``i`` uses ``sites[i % len(sites)]`` (by subject
      for longitudinal domains).
    load_median_ml: median of the log-normal lesion load (mL).
    load_sigma: log-normal sigma of the lesion load.
    longitudinal: 4-5 scans per subject with evolving lesions.
    dilate_mask: annotation style: masks drawn one voxel wider in-plane.
    other_pathology_rate: share of scans with a label-2 lesion (infarct).
  """
  name: str
  n_scans: int
  lesion_type: str
  sites: tuple[Site, ...]
  load_median_ml: float
  load_sigma: float
  longitudinal: bool = False
  dilate_mask: bool = False
  other_pathology_rate: float = 0.0


DOMAINS: dict[str, Domain] = {
    "local": Domain(
        "local", 240, "vascular",
        (Site("rss-ge-1.5t", 1.5, (1.0, 1.0, 3.0), 90.0, 0.045, 0.08, dtype="uint8"),),
        load_median_ml=4.0, load_sigma=1.0),
    "wmhseg": Domain(
        "wmhseg", 60, "vascular",
        (Site("utrecht-philips-3t", 3.0, (0.96, 0.95, 3.0), 160.0, 0.035, 0.18, "LAS"),
         Site("singapore-siemens-3t", 3.0, (1.0, 1.0, 3.0), 650.0, 0.030, 0.22, "LAS"),
         Site("amsterdam-ge-3t", 3.0, (0.98, 0.98, 3.0), 1100.0, 0.040, 0.15, "LAS")),
        load_median_ml=8.0, load_sigma=0.9, other_pathology_rate=0.35),
    "longmsles": Domain(
        "longmsles", 21, "ms",
        (Site("philips-3t", 3.0, (0.92, 0.92, 2.2), 280.0, 0.035, 0.20),),
        load_median_ml=8.0, load_sigma=0.8, longitudinal=True),
    "msseg": Domain(
        "msseg", 15, "ms",
        (Site("siemens-aera-1.5t", 1.5, (1.03, 1.03, 1.25), 380.0, 0.050, 0.12),
         Site("philips-ingenia-3t", 3.0, (0.96, 0.96, 1.5), 220.0, 0.035, 0.20),
         Site("siemens-verio-3t", 3.0, (0.9, 0.9, 1.2), 520.0, 0.030, 0.25)),
        load_median_ml=6.0, load_sigma=0.9),
    "msles": Domain(
        "msles", 15, "ms",
        (Site("siemens-3t", 3.0, (0.96, 0.96, 2.5), 300.0, 0.040, 0.18),),
        load_median_ml=5.0, load_sigma=0.9, dilate_mask=True),
}

"""Does domain randomisation help either label type on other scanners? (issue 15)

``python -m wmh_jax.study --config=experiments/domain_study.py:cpu --workdir=runs/study``

weak and strong, each without and with domain-randomised augmentation
(``experiments/*_domain.py``), evaluated on the local test set and the four
external domains of the built-in cohort. Sharing the workdir with
``experiments/study.py`` reuses its finished weak and strong runs. Other
fields as in ``experiments/study.py``.
"""

import importlib.util
from pathlib import Path

HERE = Path(__file__).resolve().parent
_SPEC = importlib.util.spec_from_file_location("study_experiment", HERE / "study.py")
_STUDY = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(_STUDY)


def get_config(arg=None):
  config = _STUDY.get_config(arg)
  suffix = f":{arg}" if arg else ""
  config.experiments = tuple(f"{name}={HERE / name}.py{suffix}"
                             for name in ("weak", "strong", "weak_domain", "strong_domain"))
  return config

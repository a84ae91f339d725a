"""Does domain randomisation help either label type on other scanners? (issue 15)

``python -m wmh_jax.study --config=experiments/domain_study.py:cpu --workdir=runs/study``

weak and strong, each without and with domain-randomised augmentation
(the config argument ``domain``: ``config.augment.domain.enabled``), evaluated on the local test set and the four
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
  plain = f":{arg}" if arg else ""
  domain = f":{arg},domain" if arg else ":domain"
  config.experiments = tuple(
      [f"{kind}={HERE / kind}.py{plain}" for kind in ("weak", "strong")] +
      [f"{kind}_domain={HERE / kind}.py{domain}" for kind in ("weak", "strong")])
  return config

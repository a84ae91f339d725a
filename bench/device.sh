#!/usr/bin/env bash
# The accelerator benchmark on a machine without network access.
#
#   bash bench/device.sh wheels [PYTHON_VERSION]   # here, with network: fill wheelhouse/
#   bash bench/device.sh run [bench.device flags]  # there: install the wheels, run the bench
#
# The target machine has JAX with CUDA, flax, optax, orbax-checkpoint, scipy and
# statsmodels, and none of the packages below: they travel as wheels in wheelhouse/
# (git-ignored, ~20 MiB; pass it along with the work tree). They are installed with
# --no-deps, so nothing already on the machine (JAX above all) is replaced. nilearn is
# only read for its MNI template files (never imported), so its own dependencies stay
# behind. The project itself runs from the work tree (python -m), uninstalled.
# `run` writes bench/results_gpu.md, or $OUT/results_gpu.md when $OUT is set.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(grain==0.2.18 array-record==0.8.6 cloudpickle portpicker etils absl-py
        nibabel==5.4.2 importlib-resources nilearn==0.14.1 ml-collections==1.1.0 PyYAML
        tensorboardX==2.6.5 tqdm)

case "${1:-}" in
  wheels)
    version="${2:-$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')}"
    rm -rf wheelhouse
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$version" \
      --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d wheelhouse "${WHEELS[@]}"
    du -sh wheelhouse
    ;;
  run)
    shift
    python3 -m pip install --quiet --no-index --no-deps wheelhouse/*.whl
    out="${OUT:-bench}/results_gpu.md"
    python3 -m bench.device --out="$out" "$@"
    ;;
  *)
    echo "usage: bash bench/device.sh wheels [PYTHON_VERSION] | run [bench.device flags]" >&2
    exit 2
    ;;
esac

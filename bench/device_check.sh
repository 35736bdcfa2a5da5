#!/usr/bin/env bash
# The GPU check (bench/device_check.py has the details):
#   bench/device_check.sh --prepare   here, with the network: wheels the GPU image lacks -> .whl/ (git-ignored)
#   bench/device_check.sh [ARGS]      on the GPU machine: installs .whl/*.whl and the package, runs the check
#   bench/device_check.sh --smoke     on a CPU: the same code paths at tiny sizes
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
PYTHON=${PYTHON:-python3}
case " $* " in
  *" --prepare "*) exec "$PYTHON" bench/device_check.py "$@" ;;
  *" --smoke "*) exec "$PYTHON" bench/device_check.py "$@" ;;
esac
if compgen -G ".whl/*.whl" >/dev/null; then
  # Into a folder of their own, first on the path: the image's packages stay as they are.
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/maxsq_site .whl/*.whl \
    || { echo "error: installing .whl/*.whl failed (run bench/device_check.sh --prepare where pip can download)"; exit 1; }
  export PYTHONPATH=/tmp/maxsq_site${PYTHONPATH:+:$PYTHONPATH}
else
  echo "note: no .whl/ here; run bench/device_check.sh --prepare first unless the image has grain, ml-collections, tensorboardX"
fi
# The package itself, without dependencies and without a build environment (no network there).
if "$PYTHON" -m pip install -q --no-deps --no-build-isolation -e . >/tmp/maxsq_editable.log 2>&1; then
  export MAXSQ_EDITABLE_INSTALL="ok (pip install --no-deps --no-build-isolation -e .)"
else
  MAXSQ_EDITABLE_INSTALL="failed: $(tail -n 3 /tmp/maxsq_editable.log | tr '\n' ' ')"
  export MAXSQ_EDITABLE_INSTALL
fi
export PYTHONPATH=$PWD:${PYTHONPATH}
export PYTHONUNBUFFERED=1
exec "$PYTHON" bench/device_check.py "$@"

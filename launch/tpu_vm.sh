#!/usr/bin/env bash
# Former interface, kept: launch/tpu_vm.sh TPU_NAME ZONE JOB_ARGS... (an existing VM).
# Same as: launch/tpu.sh --name TPU_NAME --zone ZONE -- JOB_ARGS (see launch/tpu.sh).
set -euo pipefail
[[ $# -ge 3 ]] || { echo "usage: launch/tpu_vm.sh TPU_NAME ZONE --config=... --workdir=..." >&2; exit 2; }
name=$1 zone=$2; shift 2
exec "$(dirname "$0")/tpu.sh" --name "$name" --zone "$zone" -- "$@"

#!/usr/bin/env bash
# Runs a jaxlab job on a Cloud TPU VM slice (one host or many), creating the VM if asked.
#
#   launch/tpu.sh --name NAME --zone ZONE [--type v5litepod-16] [--version RUNTIME] [--create]
#                 [--project P] [--spot] [--fetch LOCAL_DIR] [--delete] [--dry-run] \
#                 -- --config=configs/em_real.py:em_qwen7b --workdir=gs://BUCKET/run [...]
#
# Steps (each printed; --dry-run prints them without running anything):
#   1. --create: describe the VM, create it if it does not exist (--type, --version).
#   2. Install: the checkout's tracked files (git archive HEAD) are copied to every worker and
#      installed in ~/jaxlab/.venv with jax[tpu].
#   3. Run: the job starts on all workers at once; on a multi-host slice JAXLAB_DISTRIBUTED=1
#      makes each call jax.distributed.initialize() (TPU VMs need no address). Each worker logs
#      to ~/jaxlab_logs/RUN.log; worker 0's log is streamed here until its job ends.
#   4. Outputs go to --workdir (a gs:// bucket path, or a local path on the VM that only process 0
#      writes); --fetch copies a local workdir back from worker 0. --delete removes the VM.
set -euo pipefail
source "$(dirname "$0")/common.sh"

NAME="" ZONE="" TYPE="v5litepod-8" VERSION="" CREATE=0 PROJECT="" SPOT=0 FETCH="" DELETE=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) NAME=$2; shift 2 ;;
    --zone) ZONE=$2; shift 2 ;;
    --type) TYPE=$2; shift 2 ;;
    --version) VERSION=$2; shift 2 ;;
    --create) CREATE=1; shift ;;
    --project) PROJECT=$2; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --fetch) FETCH=$2; shift 2 ;;
    --delete) DELETE=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; break ;;
    *) die "unknown option $1 (job arguments go after --)" ;;
  esac
done
[[ -n $NAME && -n $ZONE ]] || die "--name and --zone are required"
[[ $# -gt 0 ]] || die "no job arguments: add -- --config=FILE:VARIANT --workdir=DIR"

# Hosts of a slice: v4/v5p names count TensorCores (2 per chip), v5e/v6e names count chips;
# a host holds 4 chips, except single-host v5e/v6e slices of up to 8 chips.
kind=${TYPE%-*}; count=${TYPE##*-}
[[ $count =~ ^[0-9]+$ ]] || die "--type $TYPE: expected NAME-COUNT, e.g. v5litepod-16 or v5p-32"
case "$kind" in
  v4|v5p) chips=$((count / 2)); hosts=$(( chips > 4 ? chips / 4 : 1 )) ;;
  v5litepod|v5e|v6e) chips=$count; hosts=$(( chips > 8 ? chips / 4 : 1 )) ;;
  *) die "--type $TYPE: unknown TPU generation $kind (v4, v5p, v5litepod, v6e)" ;;
esac
if [[ -z $VERSION ]]; then
  case "$kind" in
    v4) VERSION=tpu-ubuntu2204-base ;; v5p) VERSION=v2-alpha-tpuv5 ;;
    v5litepod|v5e) VERSION=v2-alpha-tpuv5-lite ;; v6e) VERSION=v2-alpha-tpuv6e ;;
  esac
fi
gc=(gcloud compute tpus tpu-vm)
where=(--zone "$ZONE"); [[ -n $PROJECT ]] && where+=(--project "$PROJECT")
RUN_ID=${RUN_ID:-$(date -u +%Y%m%d_%H%M%S)}
echo "# TPU $NAME ($TYPE: $chips chips, $hosts host(s)), run $RUN_ID" >&2

if [[ $CREATE == 1 ]]; then
  describe=("${gc[@]}" describe "$NAME" "${where[@]}")
  create=("${gc[@]}" create "$NAME" "${where[@]}" --accelerator-type "$TYPE" --version "$VERSION")
  [[ $SPOT == 1 ]] && create+=(--spot)
  if [[ ${DRY_RUN:-0} == 1 ]]; then  # one line: reuse the VM if it exists, else create it
    echo "$(show "${describe[@]}") >/dev/null 2>&1 ||$(show "${create[@]}" | cut -c2-)"
  elif "${describe[@]}" >/dev/null 2>&1; then
    echo "# reusing the existing TPU VM $NAME" >&2
  else
    run "${create[@]}"
  fi
fi

tarball=/tmp/jaxlab_$RUN_ID.tar.gz
source_tarball "$tarball"
run "${gc[@]}" scp "$tarball" "$NAME:jaxlab.tar.gz" "${where[@]}" --worker=all
run "${gc[@]}" ssh "$NAME" "${where[@]}" --worker=all --command \
  "mkdir -p ~/jaxlab ~/jaxlab_logs && tar xzf ~/jaxlab.tar.gz -C ~/jaxlab && cd ~/jaxlab && (test -x .venv/bin/python || python3 -m venv .venv) && .venv/bin/pip install -q -e . 'jax[tpu]==0.10.2'"

env="JAXLAB_RUN_ID=$RUN_ID"
[[ $hosts -gt 1 ]] && env+=" JAXLAB_DISTRIBUTED=1"
log="~/jaxlab_logs/$RUN_ID.log"
run "${gc[@]}" ssh "$NAME" "${where[@]}" --worker=all --command \
  "cd ~/jaxlab && nohup env $env .venv/bin/python -m jaxlab.main$(quote_args "$@") > $log 2>&1 < /dev/null & echo \$! > ~/jaxlab_logs/$RUN_ID.pid"
# Worker 0's log until its job exits; then its exit status from the log's last line.
run "${gc[@]}" ssh "$NAME" "${where[@]}" --worker=0 --command \
  "tail -n +1 -f --pid=\$(cat ~/jaxlab_logs/$RUN_ID.pid) $log"

if [[ -n $FETCH ]]; then
  workdir=""
  for a in "$@"; do [[ $a == --workdir=* ]] && workdir=${a#--workdir=}; done
  [[ $workdir == gs://* ]] && die "--fetch: the workdir $workdir is already in a bucket"
  run mkdir -p "$FETCH"
  run "${gc[@]}" scp --recurse "$NAME:$workdir" "$FETCH" "${where[@]}" --worker=0
fi
if [[ $DELETE == 1 ]]; then
  run "${gc[@]}" delete "$NAME" "${where[@]}" --quiet
fi

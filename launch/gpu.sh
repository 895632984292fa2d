#!/usr/bin/env bash
# Runs a jaxlab job on GPU hosts: this machine, or several nodes over ssh.
#
#   launch/gpu.sh [--dry-run] -- --config=FILE:VARIANT --workdir=DIR [...]        this node
#   launch/gpu.sh --hosts h1,h2 --coordinator h1:1234 [--dry-run] -- ARGS         nodes over ssh
#   launch/gpu.sh --nodes 2 --node-rank R --coordinator h1:1234 -- ARGS           one node of a
#                                                       job you start on each node yourself
#
# Install: ./.venv with jax[cuda12] (here); with --hosts the checkout's tracked files are
# copied to ~/jaxlab on every host and installed there. Multi-node: every process gets
# JAXLAB_DISTRIBUTED=1, JAX_COORDINATOR_ADDRESS, JAXLAB_NUM_PROCESSES and JAXLAB_PROCESS_ID
# (jax.distributed.initialize() in jaxlab.runtime); node 0 runs in the foreground and its
# output streams here, the others log to ~/jaxlab_logs/RUN.log on their host. Outputs go to
# --workdir (shared disk or gs://); only process 0 writes shared files.
set -euo pipefail
source "$(dirname "$0")/common.sh"

HOSTS="" COORD="" NODES=1 RANK=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --hosts) HOSTS=$2; shift 2 ;;
    --coordinator) COORD=$2; shift 2 ;;
    --nodes) NODES=$2; shift 2 ;;
    --node-rank) RANK=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; break ;;
    *) die "unknown option $1 (job arguments go after --)" ;;
  esac
done
[[ $# -gt 0 ]] || die "no job arguments: add -- --config=FILE:VARIANT --workdir=DIR"
RUN_ID=${RUN_ID:-$(date -u +%Y%m%d_%H%M%S)}
install="(test -x .venv/bin/python || python3 -m venv .venv) && .venv/bin/pip install -q -e . 'jax[cuda12]==0.10.2'"
job=".venv/bin/python -m jaxlab.main$(quote_args "$@")"

if [[ -z $HOSTS ]]; then  # this node (alone, or one rank of a job started on each node)
  cd "$(dirname "$0")/.."
  run bash -c "$install"
  if [[ $NODES -gt 1 ]]; then
    [[ -n $COORD ]] || die "--nodes $NODES needs --coordinator ADDRESS:PORT (node 0's)"
    [[ $RANK =~ ^[0-9]+$ && $RANK -lt $NODES ]] || die "--node-rank $RANK not in [0, $NODES)"
    run env JAXLAB_DISTRIBUTED=1 JAX_COORDINATOR_ADDRESS="$COORD" JAXLAB_NUM_PROCESSES="$NODES" \
      JAXLAB_PROCESS_ID="$RANK" JAXLAB_RUN_ID="$RUN_ID" .venv/bin/python -m jaxlab.main "$@"
  else
    run env JAXLAB_RUN_ID="$RUN_ID" .venv/bin/python -m jaxlab.main "$@"
  fi
  exit
fi

IFS=, read -r -a hosts <<< "$HOSTS"
n=${#hosts[@]}
[[ $n -eq 1 || -n $COORD ]] || die "--hosts with $n nodes needs --coordinator ADDRESS:PORT (node 0's)"
echo "# GPU job on $n node(s): ${hosts[*]}, run $RUN_ID" >&2
tarball=/tmp/jaxlab_$RUN_ID.tar.gz
source_tarball "$tarball"
for h in "${hosts[@]}"; do
  run scp "$tarball" "$h:jaxlab.tar.gz"
  run ssh "$h" "mkdir -p ~/jaxlab ~/jaxlab_logs && tar xzf ~/jaxlab.tar.gz -C ~/jaxlab && cd ~/jaxlab && $install"
done
pids=()
for ((i = n - 1; i >= 0; i--)); do  # node 0 last, in the foreground
  env="JAXLAB_RUN_ID=$RUN_ID"
  [[ $n -gt 1 ]] && env+=" JAXLAB_DISTRIBUTED=1 JAX_COORDINATOR_ADDRESS=$COORD JAXLAB_NUM_PROCESSES=$n JAXLAB_PROCESS_ID=$i"
  if [[ $i -gt 0 ]]; then
    run_bg ssh "${hosts[$i]}" "cd ~/jaxlab && env $env $job > ~/jaxlab_logs/$RUN_ID.log 2>&1"
    [[ ${DRY_RUN:-0} == 1 ]] || pids+=($!)
  else
    status=0
    run ssh "${hosts[0]}" "cd ~/jaxlab && env $env $job" || status=$?
  fi
done
for p in "${pids[@]}"; do wait "$p" || status=$?; done
exit "${status:-0}"

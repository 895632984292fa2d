#!/usr/bin/env bash
# Runs a jaxlab job on every host of a Cloud TPU VM slice (multi-host ready).
#
#   launch/tpu_vm.sh TPU_NAME ZONE --config=configs/sft.py:em_lora --workdir=gs://BUCKET/run \
#       --config.init.hf_path=/data/Qwen2.5-7B-Instruct --config.tokenizer.path=/data/Qwen2.5-7B-Instruct \
#       --config.mesh.shape="(1,-1,1)"
#
# The repository must already be checked out at ~/jaxlab on each worker, with data and
# checkpoints at the same paths on every host. JAXLAB_DISTRIBUTED=1 makes every host call
# jax.distributed.initialize(), after which each host feeds its own rows of the global batch.
set -euo pipefail
TPU_NAME=$1; ZONE=$2; shift 2
ARGS=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command \
  "cd ~/jaxlab && (test -x .venv/bin/python || (python3 -m venv .venv && .venv/bin/pip install -q -e . 'jax[tpu]==0.10.2')) \
   && JAXLAB_DISTRIBUTED=1 .venv/bin/python -m jaxlab.main $ARGS"

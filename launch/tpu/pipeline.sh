#!/usr/bin/env bash
# The whole path on a TPU pod slice: create the VM, install, copy the data, mount the bucket, train, index, evaluate,
# bring the logs back, delete the VM (also when a step fails; KEEP_TPU=1 keeps it).
#
#   PROJECT=my-proj BUCKET=gs://my-bucket ACCELERATOR_TYPE=v4-32 ZONE=us-central2-b \
#       CONFIG=configs/laspar.py launch/tpu/pipeline.sh
#   DRY_RUN=1 QUEUED=1 SPOT=1 launch/tpu/pipeline.sh   # print every gcloud command, run nothing
#
# A spot VM can be preempted: run the same command again; training resumes from the last
# checkpoint in $WORKDIR (a re-created VM has a fresh disk, so setup and data run again).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
require_settings PROJECT BUCKET
CONFIG="${CONFIG:-configs/laspar.py}"   # configs/NAME.py[:ARG]; its eval section names the test collection
KEEP_TPU="${KEEP_TPU:-0}"
here="$(dirname "${BASH_SOURCE[0]}")"

if [[ "$KEEP_TPU" != 1 ]]; then
  trap '"$here/delete.sh"' EXIT  # on success, on a failed step, on Ctrl-C
fi
"$here/create.sh"
"$here/setup.sh"
"$here/data.sh"
"$here/mount.sh"
"$here/run.sh" train --config "$CONFIG" --workdir "$WORKDIR"
"$here/run.sh" index --config "$CONFIG" --encoder "$WORKDIR/encoder" --index "$INDEX"
"$here/run.sh" evaluate --config "$CONFIG" --encoder "$WORKDIR/encoder" --index "$INDEX" \
  --run "$WORKDIR/run.trec" --json "$WORKDIR/eval.json"
"$here/logs.sh"

#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Creates the TPU VM slice (every host of it is a "worker") and waits until it is ready.
#
#   PROJECT=my-proj ZONE=us-central2-b ACCELERATOR_TYPE=v4-32 launch/tpu/create.sh
#   QUEUED=1 SPOT=1 launch/tpu/create.sh   # queued resource on spot capacity (waits for it)
#   DRY_RUN=1 launch/tpu/create.sh         # print the gcloud commands only
set -euo pipefail
# shellcheck source=env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
require_settings PROJECT

spot_flag=()
if [[ "$SPOT" == 1 ]]; then spot_flag=(--spot); fi

if [[ "$QUEUED" == 1 ]]; then
  # A queued resource is granted when capacity frees up; the VM appears once it is ACTIVE.
  run gcloud compute tpus queued-resources create "$QUEUED_NAME" "${GCLOUD_TPU[@]}" --node-id="$TPU_NAME" \
    --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION" "${spot_flag[@]}"
  describe=(gcloud compute tpus queued-resources describe "$QUEUED_NAME" "${GCLOUD_TPU[@]}" --format='value(state.state)')
  if [[ "$DRY_RUN" == 1 ]]; then
    run "${describe[@]}"  # polled every 60 s until it says ACTIVE
  else
    until [[ "$("${describe[@]}")" == ACTIVE ]]; do
      echo "waiting for $QUEUED_NAME: $("${describe[@]}")"
      sleep 60
    done
  fi
else
  run gcloud compute tpus tpu-vm create "$TPU_NAME" "${GCLOUD_TPU[@]}" \
    --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" "${spot_flag[@]}"
fi
# Every worker answers (the slice is up):
on_workers all "hostname"

#!/usr/bin/env bash
# Deletes the TPU VM (and its queued resource with QUEUED=1). Outputs on GCS ($WORKDIR) stay.
#
#   launch/tpu/delete.sh
#   DRY_RUN=1 QUEUED=1 launch/tpu/delete.sh
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
require_settings PROJECT

if [[ "$QUEUED" == 1 ]]; then
  run gcloud compute tpus queued-resources delete "$QUEUED_NAME" "${GCLOUD_TPU[@]}" --force --quiet
else
  run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${GCLOUD_TPU[@]}" --quiet
fi

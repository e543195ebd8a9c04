#!/usr/bin/env bash
# Brings the launchers' logs back from the workers.
#
#   launch/tpu/logs.sh                  # copy ~/$REMOTE_LOGS of every worker to ./tpu_logs/$TPU_NAME/worker-N/
#   FOLLOW=train launch/tpu/logs.sh     # stream worker 0's train.log (WORKER=2 for another worker)
#   NUM_WORKERS=4 DRY_RUN=1 launch/tpu/logs.sh
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
require_settings PROJECT
FOLLOW="${FOLLOW:-}"
WORKER="${WORKER:-0}"
LOG_DIR="${LOG_DIR:-tpu_logs/$TPU_NAME}"

if [[ -n "$FOLLOW" ]]; then
  on_workers "$WORKER" "tail -n 200 -F \$HOME/$REMOTE_LOGS/$FOLLOW.log"
  exit 0
fi
# The slice's host count: one network endpoint per worker.
count=(gcloud compute tpus tpu-vm describe "$TPU_NAME" "${GCLOUD_TPU[@]}" --format='value(networkEndpoints[].ipAddress)')
if [[ -n "${NUM_WORKERS:-}" ]]; then
  n="$NUM_WORKERS"
elif [[ "$DRY_RUN" == 1 ]]; then
  run "${count[@]}"
  n=1
else
  n="$("${count[@]}" | tr ';' '\n' | grep -c .)"
fi
for ((w = 0; w < n; w++)); do
  run mkdir -p "$LOG_DIR/worker-$w"
  run gcloud compute tpus tpu-vm scp "$TPU_NAME:$REMOTE_LOGS/*" "$LOG_DIR/worker-$w/" "${GCLOUD_TPU[@]}" \
    --worker="$w"
done

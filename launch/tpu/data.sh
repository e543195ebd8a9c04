#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Puts the collections on every worker's disk (~/$REMOTE_DATA, the launchers' $LASPAR_DATA), from GCS.
#
#   LOCAL_DATA=../shared/data launch/tpu/data.sh   # upload a local folder to $DATA_GCS first, then copy down
#   DATA_GCS=gs://my-bucket/laspar_data launch/tpu/data.sh
#
# ir_datasets ids (msmarco-passage/...) need nothing here: each worker downloads them on first use.
# Outputs (checkpoints, encoder, index, runs) go to $WORKDIR on GCS, which every worker sees.
set -euo pipefail
# shellcheck source=env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
require_settings PROJECT DATA_GCS
LOCAL_DATA="${LOCAL_DATA:-}"

if [[ -n "$LOCAL_DATA" ]]; then
  run gcloud storage rsync -r "$LOCAL_DATA" "$DATA_GCS"
fi
# Each worker copies the bucket folder to its own disk (in parallel; rsync: only what changed).
on_workers all "mkdir -p \$HOME/$REMOTE_DATA && gcloud storage rsync -r $(quote "$DATA_GCS") \$HOME/$REMOTE_DATA"

#!/usr/bin/env bash
# Runs launch/LAUNCHER.py on every worker at once with --jax_distributed (one process per host;
# jax.distributed.initialize() finds the coordinator, process count and id on TPU VMs by itself).
#
#   launch/tpu/run.sh train --config configs/laspar.py --workdir gs://my-bucket/runs/laspar
#   launch/tpu/run.sh index --config configs/laspar.py --encoder gs://my-bucket/runs/laspar/encoder \
#       --index gs://my-bucket/runs/laspar/index
#   launch/tpu/run.sh evaluate --config configs/laspar.py --encoder gs://my-bucket/runs/laspar/encoder \
#       --index gs://my-bucket/runs/laspar/index --run gs://my-bucket/runs/laspar/run.trec
#
# Every worker's output streams back here (and goes to ~/$REMOTE_LOGS/LAUNCHER.log on the worker).
# DETACH=1 starts the processes in the background instead (they survive a dropped ssh connection);
# follow them with launch/tpu/logs.sh. DRY_RUN=1 prints the gcloud command.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
require_settings PROJECT
DETACH="${DETACH:-0}"
if [[ $# -lt 1 || ! "$1" =~ ^(train|index|evaluate)$ ]]; then
  echo "usage: $0 train|index|evaluate [launcher flags...]" >&2
  exit 2
fi
launcher="$1"
shift

home=\$HOME  # expanded on the workers
log="$home/$REMOTE_LOGS/$launcher.log"
cmd="LASPAR_DATA=$home/$REMOTE_DATA $home/$REMOTE_VENV/bin/python launch/$launcher.py $(shell_words "$@") --jax_distributed"
prefix="mkdir -p $home/$REMOTE_LOGS && cd $home/$REMOTE_DIR"
if [[ "$DETACH" == 1 ]]; then
  on_workers all "$prefix && nohup env $cmd > $log 2>&1 < /dev/null &"
else
  on_workers all "set -o pipefail && $prefix && $cmd 2>&1 | tee $log"
fi

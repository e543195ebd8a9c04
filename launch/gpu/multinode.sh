#!/usr/bin/env bash
# Runs launch/LAUNCHER.py as one process of a multi-node job without a cluster manager (no SLURM,
# no torchrun): give every process the coordinator's address, the process count and its own id.
#
#   # on node 0 (10.0.0.1), then on node 1, same command but PROCESS_ID=1:
#   COORDINATOR_ADDRESS=10.0.0.1:12345 NUM_PROCESSES=2 PROCESS_ID=0 \
#       launch/gpu/multinode.sh train --config configs/laspar.py --workdir /shared/runs/laspar
#
#   # or start them all from one machine over ssh (process i on the i-th host; the first host
#   # is the coordinator; the checkout and its .venv at the same path on every host):
#   HOSTS="node0 node1" launch/gpu/multinode.sh train --config configs/laspar.py --workdir /shared/runs/laspar
#
#   DRY_RUN=1 HOSTS="node0 node1" launch/gpu/multinode.sh train ...   # print the commands only
#
# Each process uses every GPU of its node (LOCAL_DEVICE_IDS=0,1 restricts it; then run one process
# per GPU group). The workdir and the index must be on a filesystem every node sees.
set -euo pipefail

DRY_RUN="${DRY_RUN:-0}"
PYTHON="${PYTHON:-.venv/bin/python}"
PORT="${PORT:-12345}"
HOSTS="${HOSTS:-}"
LOG_DIR="${LOG_DIR:-logs}"                       # with HOSTS: one log per process, streamed back here
if [[ $# -lt 1 || ! "$1" =~ ^(train|index|evaluate)$ ]]; then
  echo "usage: $0 train|index|evaluate [launcher flags...]" >&2
  exit 2
fi
launcher="$1"
shift
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then printf '%s' "$1"; else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    local out="+" arg
    for arg in "$@"; do out+=" $(quote "$arg")"; done
    printf '%s\n' "$out"
  else
    "$@"
  fi
}

if [[ -n "$HOSTS" ]]; then
  read -r -a hosts <<< "$HOSTS"
  run mkdir -p "$LOG_DIR"
  pids=()
  for i in "${!hosts[@]}"; do
    remote="cd $(quote "$repo") && COORDINATOR_ADDRESS=${hosts[0]}:$PORT NUM_PROCESSES=${#hosts[@]} PROCESS_ID=$i"
    remote+=" PYTHON=$(quote "$PYTHON") launch/gpu/multinode.sh $launcher"
    for arg in "$@"; do remote+=" $(quote "$arg")"; done
    if [[ "$DRY_RUN" == 1 ]]; then
      run ssh "${hosts[$i]}" "$remote"
    else
      # shellcheck disable=SC2029  # $remote is built here on purpose
      ssh "${hosts[$i]}" "$remote" 2>&1 | tee "$LOG_DIR/$launcher-$i.log" | sed "s/^/[$i] /" &
      pids+=($!)
    fi
  done
  rc=0
  for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
  exit "$rc"
fi

: "${COORDINATOR_ADDRESS:?host:port of process 0 (or set HOSTS)}"
: "${NUM_PROCESSES:?the number of processes}"
: "${PROCESS_ID:?this process index, 0..NUM_PROCESSES-1}"
if [[ -n "${LOCAL_DEVICE_IDS:-}" ]]; then export JAX_LOCAL_DEVICE_IDS="$LOCAL_DEVICE_IDS"; fi
cd "$repo"
run "$PYTHON" "launch/$launcher.py" "$@" --jax_distributed --coordinator_address="$COORDINATOR_ADDRESS" \
  --num_processes="$NUM_PROCESSES" --process_id="$PROCESS_ID"

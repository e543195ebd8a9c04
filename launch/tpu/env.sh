# shellcheck shell=bash disable=SC2034  # the settings are read by the scripts that source this file
# Settings and helpers shared by the launch/tpu/*.sh scripts (sourced, not run).
#
# Every setting is an environment variable with a default; override on the command line, e.g.
#   TPU_NAME=laspar-v4 ACCELERATOR_TYPE=v4-32 ZONE=us-central2-b PROJECT=my-proj launch/tpu/create.sh
# DRY_RUN=1 prints every gcloud command (copy-pasteable) instead of running it.

# --- the TPU VM
TPU_NAME="${TPU_NAME:-laspar-tpu}"                      # name of the TPU VM (the queued resource's node id)
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-32}"           # slice: v4-8 (1 host), v4-32 (4 hosts), v5p-64, v6e-16, ...
# The VM image: v4 tpu-ubuntu2204-base, v5e v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e.
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
ZONE="${ZONE:-us-central2-b}"                           # a zone that has the slice type
PROJECT="${PROJECT:-your-gcp-project}"                  # the Google Cloud project
QUEUED="${QUEUED:-0}"                                   # 1: ask through a queued resource (waits for capacity)
QUEUED_NAME="${QUEUED_NAME:-${TPU_NAME}-qr}"            # the queued resource's name
SPOT="${SPOT:-0}"                                       # 1: spot capacity (cheaper, can be preempted)

# --- on the workers (paths relative to the remote home; every worker gets the same)
REMOTE_DIR="${REMOTE_DIR:-laspar_jax}"                  # the project's source
REMOTE_VENV="${REMOTE_VENV:-laspar_venv}"               # its virtual environment
REMOTE_DATA="${REMOTE_DATA:-laspar_data}"               # the collections ($LASPAR_DATA of the launchers)
REMOTE_LOGS="${REMOTE_LOGS:-laspar_logs}"               # one log file per launcher
REMOTE_MOUNT="${REMOTE_MOUNT:-/mnt/laspar_bucket}"      # $BUCKET mounted with gcsfuse (mount.sh): a shared folder
PYTHON_VERSION="${PYTHON_VERSION:-3.11}"                # the package needs >= 3.11 (uv fetches it)

# --- storage every worker sees (checkpoints are written collectively, the index is merged once)
BUCKET="${BUCKET:-gs://your-bucket}"
DATA_GCS="${DATA_GCS:-$BUCKET/laspar_data}"             # the collections (scifact/, ...) on GCS
WORKDIR="${WORKDIR:-$BUCKET/runs/$TPU_NAME}"            # training workdir (gs://: IO goes through etils.epath)
# The index is memory-mapped files that every host writes a part of: it goes to the gcsfuse mount.
INDEX="${INDEX:-$REMOTE_MOUNT/runs/$TPU_NAME/index}"

DRY_RUN="${DRY_RUN:-0}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
GCLOUD_TPU=(--zone="$ZONE" --project="$PROJECT")

# quote ARG: ARG as the shell reads it back (bare when safe, else single-quoted).
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# run CMD ARGS...: runs the command, or prints it with DRY_RUN=1.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    local out="+" arg
    for arg in "$@"; do out+=" $(quote "$arg")"; done
    printf '%s\n' "$out"
  else
    "$@"
  fi
}

# shell_words ARGS...: the arguments as one string a remote shell splits back into them.
shell_words() {
  local out="" arg
  for arg in "$@"; do out+="${out:+ }$(quote "$arg")"; done
  printf '%s' "$out"
}

# on_workers WORKER COMMAND: runs COMMAND (a shell string) on one worker or on all of them
# (WORKER=all, in parallel); their output streams back here.
on_workers() {
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${GCLOUD_TPU[@]}" --worker="$1" --command="$2"
}

# require_settings NAME...: stops before touching the cloud while one of these settings is a placeholder.
require_settings() {
  local name
  for name in "$@"; do
    if [[ "$DRY_RUN" != 1 && "${!name}" == *your-* ]]; then
      echo "set $name (now ${!name}), e.g. PROJECT=my-proj BUCKET=gs://my-bucket $0" >&2
      exit 2
    fi
  done
}

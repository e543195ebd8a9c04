#!/usr/bin/env bash
# Mounts $BUCKET at $REMOTE_MOUNT on every worker with gcsfuse (installed if missing): a folder all
# hosts share, for what is not written through gs:// directly (the index: each host writes its part,
# process 0 merges them; search memory-maps the files).
#
#   BUCKET=gs://my-bucket launch/tpu/mount.sh
#   DRY_RUN=1 launch/tpu/mount.sh
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
require_settings PROJECT BUCKET

path="${BUCKET#gs://}"
bucket="${path%%/*}"
only_dir=""
if [[ "$path" == */* && -n "${path#*/}" ]]; then only_dir="--only-dir $(quote "${path#*/}") "; fi
repo="https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -c -s) main"
install="curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc > /dev/null"
install+=" && echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] $repo\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list"
install+=" && sudo apt-get update -q && sudo apt-get install -y -q fuse gcsfuse"
mount="sudo mkdir -p $REMOTE_MOUNT && sudo chown \$(id -u):\$(id -g) $REMOTE_MOUNT"
mount+=" && gcsfuse --implicit-dirs $only_dir$(quote "$bucket") $REMOTE_MOUNT"
on_workers all "(command -v gcsfuse > /dev/null || ($install)) && (mountpoint -q $REMOTE_MOUNT || ($mount))"

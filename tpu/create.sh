#!/usr/bin/env bash
# Creates a TPU VM or pod slice for cai_jax.
#
#   tpu/create.sh --name cai-v4 --zone us-central2-b --type v4-8 [--spot] [--dry-run]
#   tpu/create.sh --name cai-v5p --zone us-east5-a --type v5p-64 --queued --spot
#
# --type       accelerator type: v4-8, v5litepod-16 (v5e-16 is accepted), v5p-64, ...
# --version    TPU software version; the default follows the type
#              (v4: tpu-ubuntu2204-base, v5e: v2-alpha-tpuv5-lite, v5p: v2-alpha-tpuv5,
#              v6e: v2-alpha-tpuv6e)
# --spot       spot capacity (cheaper, can be preempted at any time; see README)
# --queued     request through queued resources (waits for capacity; needed for
#              large v5p/v5e slices in most zones)
# --dry-run    print the gcloud command instead of running it
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

parse_common "$@"
set -- "${REST[@]+"${REST[@]}"}"
TYPE=""
VERSION=""
SPOT=0
QUEUED=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --type) TYPE="${2:-}"; shift 2 || die "--type needs a value" ;;
    --type=*) TYPE="${1#*=}"; shift ;;
    --version) VERSION="${2:-}"; shift 2 || die "--version needs a value" ;;
    --version=*) VERSION="${1#*=}"; shift ;;
    --spot) SPOT=1; shift ;;
    --queued) QUEUED=1; shift ;;
    *) die "unknown flag '$1' (see the header of $0)" ;;
  esac
done
[[ -n "$TYPE" ]] || die "no accelerator type: pass --type (e.g. v4-8, v5litepod-16, v5p-64)"
# The console calls v5e slices v5e-N; gcloud wants v5litepod-N.
if [[ "$TYPE" =~ ^v5e-([0-9]+)$ ]]; then
  TYPE="v5litepod-${BASH_REMATCH[1]}"
fi
[[ "$TYPE" =~ ^v[0-9]+[a-z]*-[0-9]+$ ]] || die "bad --type '$TYPE': expected e.g. v4-8, v5litepod-16, v5p-64"
if [[ -z "$VERSION" ]]; then
  case "$TYPE" in
    v5litepod-*) VERSION="v2-alpha-tpuv5-lite" ;;
    v5p-*) VERSION="v2-alpha-tpuv5" ;;
    v6e-*) VERSION="v2-alpha-tpuv6e" ;;
    v2-*|v3-*|v4-*) VERSION="tpu-ubuntu2204-base" ;;
    *) die "no default software version for '$TYPE': pass --version" ;;
  esac
fi

EXTRA=()
if [[ $SPOT == 1 ]]; then
  EXTRA+=(--spot)
fi
if [[ $QUEUED == 1 ]]; then
  run gcloud compute tpus queued-resources create "$TPU_NAME" --node-id="$TPU_NAME" \
    "${GCLOUD_LOC[@]}" --accelerator-type="$TYPE" --runtime-version="$VERSION" \
    "${EXTRA[@]+"${EXTRA[@]}"}"
  if [[ $DRY_RUN == 0 ]]; then
    echo "queued; watch with: gcloud compute tpus queued-resources describe $TPU_NAME --zone=$TPU_ZONE"
  fi
else
  run gcloud compute tpus tpu-vm create "$TPU_NAME" "${GCLOUD_LOC[@]}" \
    --accelerator-type="$TYPE" --version="$VERSION" "${EXTRA[@]+"${EXTRA[@]}"}"
fi

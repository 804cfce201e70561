#!/usr/bin/env bash
# Deletes a TPU VM or pod slice (and its queued resource, if it came from one).
#
#   tpu/delete.sh --name cai-v4 --zone us-central2-b [--queued] [--dry-run]
#
# --queued     the slice was created with create.sh --queued: delete the queued
#              resource too (--force removes its node first)
# --dry-run    print the gcloud command instead of running it
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

parse_common "$@"
set -- "${REST[@]+"${REST[@]}"}"
QUEUED=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --queued) QUEUED=1; shift ;;
    *) die "unknown flag '$1' (see the header of $0)" ;;
  esac
done
if [[ $QUEUED == 1 ]]; then
  run gcloud compute tpus queued-resources delete "$TPU_NAME" "${GCLOUD_LOC[@]}" --force --quiet
else
  run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${GCLOUD_LOC[@]}" --quiet
fi

#!/usr/bin/env bash
# Copies a run's work directory back from the slice (or from its bucket).
#
#   tpu/fetch.sh --name cai-v4 --zone us-central2-b --workdir gs://BUCKET/runs/cai-7b --dest runs/
#   tpu/fetch.sh --name cai-v4 --zone us-central2-b --workdir workdir/tiny --dest runs/ --workers 0,1
#
# --workdir   the --workdir given to run.sh. A gs:// path is copied with
#             `gcloud storage`; a local path is copied from each listed worker
#             into DEST/worker-N (with a shared gs:// workdir nothing is per host).
# --dest      local directory to copy into (created if missing)
# --workers   comma-separated worker ids for a local workdir (default 0)
# --dry-run   print the commands instead of running them
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

parse_common "$@"
set -- "${REST[@]+"${REST[@]}"}"
WORKDIR=""
DEST=""
WORKERS="0"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --workdir) WORKDIR="${2:-}"; shift 2 || die "--workdir needs a value" ;;
    --workdir=*) WORKDIR="${1#*=}"; shift ;;
    --dest) DEST="${2:-}"; shift 2 || die "--dest needs a value" ;;
    --dest=*) DEST="${1#*=}"; shift ;;
    --workers) WORKERS="${2:-}"; shift 2 || die "--workers needs a value" ;;
    --workers=*) WORKERS="${1#*=}"; shift ;;
    *) die "unknown flag '$1' (see the header of $0)" ;;
  esac
done
[[ -n "$WORKDIR" ]] || die "no workdir: pass --workdir (the one given to run.sh)"
[[ -n "$DEST" ]] || die "no destination: pass --dest LOCAL_DIR"
[[ "$WORKERS" =~ ^[0-9]+(,[0-9]+)*$ ]] || die "bad --workers '$WORKERS': expected e.g. 0 or 0,1,2,3"

run mkdir -p "$DEST"
if [[ "$WORKDIR" == gs://* ]]; then
  run gcloud storage cp --recursive "$WORKDIR" "$DEST"
else
  # A relative workdir is relative to the project directory on the worker.
  case "$WORKDIR" in
    /*|~*) REMOTE="$WORKDIR" ;;
    *) REMOTE="$REMOTE_DIR/$WORKDIR" ;;
  esac
  IFS=, read -r -a IDS <<< "$WORKERS"
  for w in "${IDS[@]}"; do
    run mkdir -p "$DEST/worker-$w"
    run gcloud compute tpus tpu-vm scp --recurse "$TPU_NAME:$REMOTE" "$DEST/worker-$w" \
      --worker="$w" "${GCLOUD_LOC[@]}"
  done
fi

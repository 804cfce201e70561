#!/usr/bin/env bash
# Runs a cai_jax config on every worker of a TPU slice at once.
#
#   tpu/run.sh --name cai-v4 --zone us-central2-b --config configs/pipeline.py \
#       --workdir gs://BUCKET/runs/cai-7b [--background] [--dry-run] [-- --config.seed=1 ...]
#
# Every worker starts the same command; CAI_JAX_DISTRIBUTED=1 makes each one call
# jax.distributed.initialize(), which on TPU VMs finds the other hosts itself.
# Arguments after `--` go to `python -m cai_jax.main` unchanged (ml_collections
# overrides such as --config.mesh.ici='(1,-1,1)').
#
# --workdir     where stages write; on a multi-host slice use a gs:// path (all
#               hosts must see the same directory). Rerunning the same command
#               resumes from the last Orbax checkpoint there.
# --background  start under nohup and return; logs go to ~/cai_jax_run.log on each
#               worker (read them with --tail)
# --tail        show the last lines of ~/cai_jax_run.log on every worker and exit
# --dry-run     print the command instead of running it
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

parse_common "$@"
set -- "${REST[@]+"${REST[@]}"}"
CONFIG=""
WORKDIR=""
BACKGROUND=0
TAIL=0
PASS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --config) CONFIG="${2:-}"; shift 2 || die "--config needs a value" ;;
    --config=*) CONFIG="${1#*=}"; shift ;;
    --workdir) WORKDIR="${2:-}"; shift 2 || die "--workdir needs a value" ;;
    --workdir=*) WORKDIR="${1#*=}"; shift ;;
    --background) BACKGROUND=1; shift ;;
    --tail) TAIL=1; shift ;;
    --) shift; PASS=("$@"); break ;;
    *) die "unknown flag '$1' (flags for cai_jax.main go after --)" ;;
  esac
done
LOG="\$HOME/cai_jax_run.log"
if [[ $TAIL == 1 ]]; then
  ssh_all "tail -n 20 $LOG"
  exit 0
fi
[[ -n "$CONFIG" ]] || die "no config: pass --config configs/NAME.py[:ARG] (a path inside the project)"
[[ -n "$WORKDIR" ]] || die "no workdir: pass --workdir gs://BUCKET/PATH (or a local path on a single host)"

# The remote command is one string: quote every user-supplied word for the
# remote shell.
# A leading ~/ means the worker's home directory (e.g. a gcsfuse mount from setup.sh).
case "$WORKDIR" in
  \~/*) ARGS="--config=$(quote_word "$CONFIG") --workdir=\"\$HOME\"/$(quote_word "${WORKDIR#\~/}")" ;;
  *) ARGS="--config=$(quote_word "$CONFIG") --workdir=$(quote_word "$WORKDIR")" ;;
esac
for a in "${PASS[@]+"${PASS[@]}"}"; do
  ARGS+=" $(quote_word "$a")"
done
CMD="CAI_JAX_DISTRIBUTED=1 .venv/bin/python -m cai_jax.main $ARGS"
if [[ $BACKGROUND == 1 ]]; then
  # nohup + no stdin: the run survives the ssh session ending.
  ssh_all "cd $REMOTE_DIR && nohup bash -c $(quote_word "$CMD") > $LOG 2>&1 < /dev/null &"
else
  ssh_all "set -o pipefail; cd $REMOTE_DIR && $CMD 2>&1 | tee $LOG"
fi

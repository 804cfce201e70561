# shellcheck shell=bash
# Helpers shared by the tpu/ scripts: common flags, quoting, and the one place
# where a command is either printed (--dry-run) or executed.

TPU_NAME="${TPU_NAME:-}"
TPU_ZONE="${TPU_ZONE:-}"
TPU_PROJECT="${TPU_PROJECT:-}"
DRY_RUN=0
REMOTE_DIR="${CAI_JAX_REMOTE_DIR:-cai_jax}"

die() {
  echo "$(basename "$0"): $*" >&2
  exit 2
}

# Quotes one word so that the printed line can be pasted back into a shell:
# plain words stay as they are, anything else is single-quoted.
quote_word() {
  local w="$1"
  if [[ "$w" =~ ^[A-Za-z0-9_./:=@,+%^-]+$ ]]; then
    printf '%s' "$w"
  else
    printf "'%s'" "${w//\'/\'\\\'\'}"
  fi
}

# Runs a command, or prints it (one line, shell-quoted) under --dry-run.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    local first=1 w
    for w in "$@"; do
      [[ $first == 1 ]] || printf ' '
      quote_word "$w"
      first=0
    done
    printf '\n'
  else
    "$@"
  fi
}

# Parses the flags every script shares; sets REST to the remaining arguments.
# --name / --zone / --project default to $TPU_NAME / $TPU_ZONE / $TPU_PROJECT.
parse_common() {
  REST=()
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --name) TPU_NAME="${2:-}"; shift 2 || die "--name needs a value" ;;
      --name=*) TPU_NAME="${1#*=}"; shift ;;
      --zone) TPU_ZONE="${2:-}"; shift 2 || die "--zone needs a value" ;;
      --zone=*) TPU_ZONE="${1#*=}"; shift ;;
      --project) TPU_PROJECT="${2:-}"; shift 2 || die "--project needs a value" ;;
      --project=*) TPU_PROJECT="${1#*=}"; shift ;;
      --remote-dir) REMOTE_DIR="${2:-}"; shift 2 || die "--remote-dir needs a value" ;;
      --remote-dir=*) REMOTE_DIR="${1#*=}"; shift ;;
      --dry-run) DRY_RUN=1; shift ;;
      *) REST+=("$1"); shift ;;
    esac
  done
  [[ -n "$TPU_NAME" ]] || die "no TPU name: pass --name NAME or set TPU_NAME"
  [[ -n "$TPU_ZONE" ]] || die "no zone: pass --zone ZONE (e.g. us-central2-b) or set TPU_ZONE"
  [[ "$TPU_NAME" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
    die "bad TPU name '$TPU_NAME': use lowercase letters, digits and '-', starting with a letter"
  [[ "$REMOTE_DIR" =~ ^[A-Za-z0-9_./~-]+$ ]] ||
    die "bad --remote-dir '$REMOTE_DIR': use letters, digits, '_', '.', '/', '-' only"
  GCLOUD_LOC=(--zone="$TPU_ZONE")
  if [[ -n "$TPU_PROJECT" ]]; then
    GCLOUD_LOC+=(--project="$TPU_PROJECT")
  fi
}

# Runs a shell command line on every worker of the slice at once.
ssh_all() {
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker=all "${GCLOUD_LOC[@]}" --command="$1"
}

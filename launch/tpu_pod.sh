#!/usr/bin/env bash
# Run refjax on every worker of a Cloud TPU VM pod with jax.distributed (auto-detected on TPU).
#
#   launch/tpu_pod.sh --name refjax-v4-32 --zone us-central2-b --accelerator-type v4-32 \
#       --config configs/llama.py --workdir /mnt/shared/refjax/llama [--project P] \
#       [--data-dir ../shared] [--dry-run] [-- extra refjax.main flags, e.g. --config.method=sft]
#
# The workdir must be a filesystem every worker sees (e.g. a Filestore/NFS mount); --data-dir
# copies a local data folder (the layout of ../shared) to every worker and points REFJAX_DATA
# at it.
#
# Steps: create the pod unless it exists, copy the code and configs to every worker, install,
# start `python -m refjax.main` on all workers at once, then stream worker 0's log.
# --dry-run prints each command instead of running it.
set -euo pipefail

NAME="" ZONE="" ACCEL="v4-32" VERSION="tpu-ubuntu2204-base" PROJECT="" CONFIG="configs/llama.py"
WORKDIR="" DATA_DIR="" DRY=0 EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) NAME="$2"; shift 2 ;;
    --zone) ZONE="$2"; shift 2 ;;
    --accelerator-type) ACCEL="$2"; shift 2 ;;
    --version) VERSION="$2"; shift 2 ;;
    --project) PROJECT="$2"; shift 2 ;;
    --config) CONFIG="$2"; shift 2 ;;
    --workdir) WORKDIR="$2"; shift 2 ;;
    --data-dir) DATA_DIR="$2"; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "tpu_pod.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
for v in NAME ZONE WORKDIR; do
  [[ -n "${!v}" ]] || { echo "tpu_pod.sh: --${v,,} is required" >&2; exit 2; }
done

run() { if [[ $DRY == 1 ]]; then printf '+'; printf ' %q' "$@"; printf '\n'; else "$@"; fi; }
G=(gcloud compute tpus tpu-vm)
COMMON=(--zone="$ZONE")
[[ -n "$PROJECT" ]] && COMMON+=(--project="$PROJECT")
REMOTE_DIR='~/refjax'
LOG='~/refjax/run.log'
ENV_PREFIX=""
[[ -n "$DATA_DIR" ]] && ENV_PREFIX="REFJAX_DATA=~/refjax_shared/data "
MAIN="${ENV_PREFIX}python3 -m refjax.main --config=$CONFIG --workdir=$WORKDIR --config.distributed.auto_detect=True"
for e in "${EXTRA[@]}"; do MAIN+=" $(printf '%q' "$e")"; done

if [[ $DRY == 1 ]] || ! "${G[@]}" describe "$NAME" "${COMMON[@]}" >/dev/null 2>&1; then
  run "${G[@]}" create "$NAME" "${COMMON[@]}" --accelerator-type="$ACCEL" --version="$VERSION"
fi
run "${G[@]}" ssh "$NAME" "${COMMON[@]}" --worker=all --command="mkdir -p $REMOTE_DIR"
run "${G[@]}" scp --recurse pyproject.toml README.md refjax configs launch \
  "$NAME:$REMOTE_DIR" "${COMMON[@]}" --worker=all
if [[ -n "$DATA_DIR" ]]; then
  run "${G[@]}" scp --recurse "$DATA_DIR" "$NAME:~/refjax_shared" "${COMMON[@]}" --worker=all
fi
run "${G[@]}" ssh "$NAME" "${COMMON[@]}" --worker=all \
  --command="cd $REMOTE_DIR && pip install -q -e . 'jax[tpu]'"
run "${G[@]}" ssh "$NAME" "${COMMON[@]}" --worker=all \
  --command="cd $REMOTE_DIR && nohup $MAIN > $LOG 2>&1 &"
run "${G[@]}" ssh "$NAME" "${COMMON[@]}" --worker=0 --command="tail -n +1 -F $LOG"

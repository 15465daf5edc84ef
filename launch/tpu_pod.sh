#!/usr/bin/env bash
# wav2vec 2.0 pretraining on a Cloud TPU VM pod slice (every worker runs one JAX process).
#
#   launch/tpu_pod.sh [FLAGS] COMMAND... [-- EXTRA...]
#
# Commands (several run in the order given, e.g. `create install train`):
#   create    gcloud compute tpus tpu-vm create NAME --zone --accelerator-type --version
#   install   pack this checkout, copy it to every worker (scp --worker=all), pip install it there
#             with jax[tpu] (ssh --worker=all)
#   train     on every worker: w2v2 pretrain --config=CONFIG --workdir=WORKDIR EXTRA...
#             (W2V2_COORDINATOR=auto: jax.distributed.initialize() finds the slice by itself)
#   ssh       on every worker: the shell command EXTRA... (e.g. -- 'tail -n 20 ~/w2v2-train.log')
#   delete    delete the TPU VM (asks nothing: --quiet)
#   up        create, install, train
#
# Flags (defaults in brackets):
#   --name NAME              TPU VM name [w2v2-$USER]
#   --zone ZONE              [us-central2-b]
#   --accelerator-type TYPE  e.g. v4-8, v4-64, v5litepod-16 [v4-64]
#   --version VERSION        TPU VM runtime / software version [tpu-ubuntu2204-base]
#   --project PROJECT        [gcloud's configured project]
#   --bucket BUCKET          GCS bucket for the run; WORKDIR defaults to gs://BUCKET/w2v2/NAME
#   --workdir URL            run directory (checkpoints, metrics) [gs://BUCKET/w2v2/NAME]
#   --config SPEC            a packaged config (pretrain:base, pretrain:large, ...) or a config file of
#                            your own in the checkout, PATH.py:ARG [pretrain:base]
#   --jax SPEC               pip requirement for JAX on the workers [jax[tpu]]
#   --spot                   create a Spot VM (preemptible: SIGTERM -> checkpoint, see checkpoint.py)
#   --detach                 train: run under nohup on the workers, output in ~/w2v2-train.log
#   --dry-run                print every command instead of running it (gcloud not needed)
#   -h, --help               this text
#
# Example:
#   launch/tpu_pod.sh --bucket my-bucket --accelerator-type v4-64 up -- --config.train.steps=400000
#   launch/tpu_pod.sh --bucket my-bucket delete
set -euo pipefail

usage() {  # the comment block at the top of this file
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
}

die() {
  echo "tpu_pod.sh: $*" >&2
  exit 2
}

name="w2v2-${USER:-user}"
zone="us-central2-b"
accelerator="v4-64"
version="tpu-ubuntu2204-base"
project=""
bucket=""
workdir=""
config="pretrain:base"
jax_spec="jax[tpu]"
spot=0
detach=0
dry_run=0
commands=()
extra=()

while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) name=${2:?--name needs a value}; shift 2 ;;
    --name=*) name=${1#*=}; shift ;;
    --zone) zone=${2:?--zone needs a value}; shift 2 ;;
    --zone=*) zone=${1#*=}; shift ;;
    --accelerator-type) accelerator=${2:?--accelerator-type needs a value}; shift 2 ;;
    --accelerator-type=*) accelerator=${1#*=}; shift ;;
    --version) version=${2:?--version needs a value}; shift 2 ;;
    --version=*) version=${1#*=}; shift ;;
    --project) project=${2:?--project needs a value}; shift 2 ;;
    --project=*) project=${1#*=}; shift ;;
    --bucket) bucket=${2:?--bucket needs a value}; shift 2 ;;
    --bucket=*) bucket=${1#*=}; shift ;;
    --workdir) workdir=${2:?--workdir needs a value}; shift 2 ;;
    --workdir=*) workdir=${1#*=}; shift ;;
    --config) config=${2:?--config needs a value}; shift 2 ;;
    --config=*) config=${1#*=}; shift ;;
    --jax) jax_spec=${2:?--jax needs a value}; shift 2 ;;
    --jax=*) jax_spec=${1#*=}; shift ;;
    --spot) spot=1; shift ;;
    --detach) detach=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    create | install | train | ssh | delete | up) commands+=("$1"); shift ;;
    *) usage >&2; die "unknown argument '$1'" ;;
  esac
done
[[ ${#commands[@]} -gt 0 ]] || { usage >&2; die "no command given"; }

bucket=${bucket#gs://}
if [[ -z "$workdir" && -n "$bucket" ]]; then
  workdir="gs://${bucket%/}/w2v2/$name"
fi

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
archive="${TMPDIR:-/tmp}/w2v2_jax-$name.tar.gz"
remote_dir="w2v2_jax"        # relative to the workers' home directories

# Shell-quote words only where needed, so printed commands are readable and copy-pastable.
quote() {
  local word out=()
  for word in "$@"; do
    if [[ "$word" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      out+=("$word")
    else
      out+=("'${word//\'/\'\\\'\'}'")
    fi
  done
  echo "${out[*]}"
}

run() {
  if ((dry_run)); then
    quote "$@"
  else
    echo "+ $(quote "$@")" >&2
    "$@"
  fi
}

gcloud_tpu() {
  local verb=$1
  shift
  local args=(gcloud compute tpus tpu-vm "$verb" "$@" "--zone=$zone")
  [[ -n "$project" ]] && args+=("--project=$project")
  run "${args[@]}"
}

on_all_workers() {
  gcloud_tpu ssh "$name" --worker=all "--command=$1"
}

do_create() {
  local args=("$name" "--accelerator-type=$accelerator" "--version=$version")
  ((spot)) && args+=(--spot)
  gcloud_tpu create "${args[@]}"
}

do_install() {
  # The working tree as it is (uncommitted edits included), without environments and outputs.
  run tar -czf "$archive" -C "$repo_root" --exclude=.git --exclude=.venv --exclude='*.egg-info' \
    --exclude=__pycache__ --exclude=.pytest_cache .
  gcloud_tpu scp "$archive" "$name:~/w2v2_jax.tar.gz" --worker=all
  on_all_workers "set -e; rm -rf ~/$remote_dir; mkdir -p ~/$remote_dir; \
tar -xzf ~/w2v2_jax.tar.gz -C ~/$remote_dir; \
python3 -m pip install -U pip; \
python3 -m pip install -U $(quote "$jax_spec") ~/$remote_dir'[gcs]'"
}

do_train() {
  [[ -n "$workdir" ]] || die "train needs --workdir or --bucket (a gs:// run directory all workers share)"
  local cmd
  cmd="cd ~/$remote_dir && W2V2_COORDINATOR=auto python3 -m w2v2_jax.cli pretrain \
$(quote "--config=$config" "--workdir=$workdir" "${extra[@]}")"
  if ((detach)); then
    cmd="nohup bash -c $(quote "$cmd") > ~/w2v2-train.log 2>&1 < /dev/null &"
  fi
  on_all_workers "$cmd"
}

do_ssh() {
  [[ ${#extra[@]} -gt 0 ]] || die "ssh needs a command after --"
  on_all_workers "${extra[*]}"
}

do_delete() {
  gcloud_tpu delete "$name" --quiet
}

for command in "${commands[@]}"; do
  case "$command" in
    create) do_create ;;
    install) do_install ;;
    train) do_train ;;
    ssh) do_ssh ;;
    delete) do_delete ;;
    up) do_create; do_install; do_train ;;
  esac
done

#!/usr/bin/env bash
# Simulate a multi-host JAX run on this machine: N processes, each with its own fake CPU devices.
#
#   launch/local_multihost.sh N [ARGS...]
#
# Process i gets W2V2_COORDINATOR=127.0.0.1:PORT W2V2_NUM_PROCESSES=N W2V2_PROCESS_ID=i (what
# w2v2_jax.train.parallel.initialize_distributed reads) and
# XLA_FLAGS=--xla_force_host_platform_device_count=$DEVICES_PER_PROCESS, and runs
# `$W2V2_CMD ARGS...` (default `python -m w2v2_jax.cli ARGS...`). Output lines are prefixed with
# "[i] ". The script waits for all processes; when one fails it stops the others and returns that
# process's exit status (0 only if every process succeeded).
#
# Environment:
#   W2V2_CMD             command to run (shell words; quoting allowed), default "$PYTHON -m w2v2_jax.cli"
#   PYTHON               default python3 (or python) from PATH
#   DEVICES_PER_PROCESS  fake CPU devices per process (default 2)
#   W2V2_PORT            coordinator port (default: a free port picked automatically)
#   JAX_PLATFORMS        default "cpu": the fake devices exist only on the CPU backend
#   W2V2_KILL_GRACE      seconds between SIGTERM and SIGKILL when stopping the others (default 10;
#                        JAX's preemption service catches SIGTERM, so SIGKILL may be needed)
#
# Example: launch/local_multihost.sh 2 pretrain --config=pretrain:tiny --workdir=/tmp/run
set -euo pipefail

usage() {  # the comment block at the top of this file
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
}

if [[ $# -lt 1 ]]; then
  usage >&2
  exit 2
fi
if [[ "$1" == "-h" || "$1" == "--help" ]]; then
  usage
  exit 0
fi
if ! [[ "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "local_multihost.sh: N must be a positive integer, got '$1'" >&2
  exit 2
fi
num=$1
shift

python_bin=${PYTHON:-$(command -v python3 || command -v python)}
cmd=${W2V2_CMD:-$python_bin -m w2v2_jax.cli}
devices=${DEVICES_PER_PROCESS:-2}
grace=${W2V2_KILL_GRACE:-10}
port=${W2V2_PORT:-$("$python_bin" -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])')}

tmp=$(mktemp -d)
wrappers=()

# The pid of process i's command itself (written by its subshell just before exec).
child_pid() {
  cat "$tmp/pid.$1" 2>/dev/null || true
}

stop_all() {
  local i pid
  for i in "${!wrappers[@]}"; do
    pid=$(child_pid "$i")
    [[ -n "$pid" ]] && kill -TERM "$pid" 2>/dev/null || true
  done
  local deadline=$((SECONDS + grace))
  for i in "${!wrappers[@]}"; do
    while kill -0 "${wrappers[$i]}" 2>/dev/null && ((SECONDS < deadline)); do
      sleep 0.2
    done
    pid=$(child_pid "$i")
    [[ -n "$pid" ]] && kill -KILL "$pid" 2>/dev/null || true
  done
}

cleanup() {
  stop_all
  wait 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'echo "local_multihost.sh: interrupted, stopping all processes" >&2; exit 130' INT TERM

prefix() {
  local line
  while IFS= read -r line || [[ -n "$line" ]]; do
    printf '[%s] %s\n' "$1" "$line"
  done
}

# Process i in the background: its stdout and stderr go through `prefix` to our stdout; with
# pipefail the pipeline's status is the command's.
run_one() {
  local i=$1
  shift
  (
    export W2V2_COORDINATOR="127.0.0.1:$port" W2V2_NUM_PROCESSES="$num" W2V2_PROCESS_ID="$i"
    export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$devices"
    export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
    echo "$BASHPID" >"$tmp/pid.$i"
    eval "exec $cmd \"\$@\""
  ) 2>&1 | prefix "$i"
}

echo "local_multihost.sh: $num processes x $devices devices, coordinator 127.0.0.1:$port:" \
  "$cmd${*:+ $(printf '%q ' "$@")}" >&2
for ((i = 0; i < num; i++)); do
  # (2>/dev/null hides only this shell's own "Killed" job notices; the command's stderr is piped.)
  run_one "$i" "$@" 2>/dev/null &
  wrappers[$i]=$!
done

status=0
running=$num
declare -A done_
while ((running > 0)); do
  for i in "${!wrappers[@]}"; do
    [[ -n "${done_[$i]:-}" ]] && continue
    kill -0 "${wrappers[$i]}" 2>/dev/null && continue
    rc=0
    wait "${wrappers[$i]}" || rc=$?
    done_[$i]=1
    running=$((running - 1))
    if ((rc != 0 && status == 0)); then
      status=$rc
      echo "local_multihost.sh: process $i exited with status $rc; stopping the others" >&2
      stop_all
    fi
  done
  ((running > 0)) && sleep 0.2
done
exit "$status"

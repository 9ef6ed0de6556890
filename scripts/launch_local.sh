#!/usr/bin/env bash
# Starts N cooperating processes of a jax.distributed program on this host.
#
#   scripts/launch_local.sh NUM_PROCESSES [--port=PORT] [--timeout=SECONDS] \
#       [--flag_prefix=PREFIX] -- PROGRAM [ARGS...]
#
# Process i runs `PROGRAM ARGS --PREFIXcoordinator=127.0.0.1:PORT
# --PREFIXnum_processes=N --PREFIXprocess_id=i` (PREFIX is empty by default;
# `config.distributed.` sets the federated binary's config.distributed), with
# every `{process_id}` in ARGS replaced by i; process 0 hosts the coordinator.
# Each
# process's output goes to stderr prefixed with [pI]. The script waits for
# all of them (each killed after --timeout seconds, default 300), and exits
# non-zero, naming the processes that failed, if any did; when one fails,
# the others are stopped instead of waiting for peers that will never come.
# Examples (two processes on a client store): the federated binary, whose
# process 0 writes the run into /tmp/fed_0 (process 1 only claims /tmp/fed_1),
#
#   scripts/launch_local.sh 2 --flag_prefix=config.distributed. -- \
#       .venv/bin/python -m experiments.federated \
#       --config=configs/fed_store.py:smoke --config.data.store=/tmp/store \
#       --workdir=/tmp/fed_{process_id}
#
# and plain FedAvg rounds:
#
#   scripts/launch_local.sh 2 -- .venv/bin/python scripts/multiprocess_fedavg.py \
#       --store=/tmp/store --cohort_size=10 --out=/tmp/two.npz
set -u -o pipefail

if [[ $# -lt 1 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 NUM_PROCESSES [--port=PORT] [--timeout=SECONDS] [--flag_prefix=PREFIX] -- PROGRAM [ARGS...]" >&2
  echo "NUM_PROCESSES must be a positive integer; got '${1:-}'." >&2
  exit 2
fi
num_processes=$1
shift
port=12355
timeout_s=300
prefix=''
while [[ $# -gt 0 && "$1" != "--" ]]; do
  case "$1" in
    --port=*) port="${1#--port=}" ;;
    --timeout=*) timeout_s="${1#--timeout=}" ;;
    --flag_prefix=*) prefix="${1#--flag_prefix=}" ;;
    *) echo "$0: unknown option '$1' (expected --port=, --timeout=, --flag_prefix= or --)" >&2; exit 2 ;;
  esac
  shift
done
if [[ $# -lt 2 ]]; then
  echo "$0: give the program after --, e.g. -- python scripts/multiprocess_fedavg.py" >&2
  exit 2
fi
shift  # the --

pids=()
for ((i = 0; i < num_processes; i++)); do
  args=()
  for arg in "$@"; do
    args+=("${arg//\{process_id\}/$i}")
  done
  (timeout --kill-after=10 "$timeout_s" "${args[@]}" \
       --"${prefix}coordinator=127.0.0.1:${port}" \
       --"${prefix}num_processes=$num_processes" \
       --"${prefix}process_id=$i" 2>&1 | sed -u "s/^/[p$i] /" >&2) &
  pids+=($!)
done

failed=()
remaining=("${!pids[@]}")
while [[ ${#remaining[@]} -gt 0 ]]; do
  still=()
  for i in "${remaining[@]}"; do
    if kill -0 "${pids[$i]}" 2>/dev/null; then
      still+=("$i")
    else
      wait "${pids[$i]}"
      rc=$?
      if [[ $rc -ne 0 ]]; then
        failed+=("process $i (exit $rc)")
      fi
    fi
  done
  remaining=("${still[@]+"${still[@]}"}")
  if [[ ${#failed[@]} -gt 0 && ${#remaining[@]} -gt 0 ]]; then
    for i in "${remaining[@]}"; do
      pkill -TERM -P "${pids[$i]}" 2>/dev/null
    done
  fi
  sleep 0.2
done

if [[ ${#failed[@]} -gt 0 ]]; then
  echo "launch_local.sh: ${failed[*]} failed; see the [pI] lines above." >&2
  exit 1
fi
echo "launch_local.sh: all ${num_processes} processes finished." >&2

# Sourced by the scripts: progress lines for long steps. Set PROGRESS_NAME before sourcing.
# shellcheck shell=bash

say() { echo "${PROGRESS_NAME:-joulegate}: $*" >&2; }

# Run "$@" with its output in a log; every 30 s say it is still going. On failure show the log's end.
with_heartbeat() {
  local what=$1; shift
  local log; log=$(mktemp -t joulegate-bootstrap.XXXXXX)
  local t0=$SECONDS
  "$@" >"$log" 2>&1 &
  local pid=$! beat=30
  while kill -0 "$pid" 2>/dev/null; do
    sleep 1
    if (( SECONDS - t0 >= beat )); then
      say "  ... still $what ($(( (SECONDS - t0) / 60 )) min $(( (SECONDS - t0) % 60 )) s so far)"
      beat=$(( beat + 30 ))
    fi
  done
  if ! wait "$pid"; then
    say "$what failed; the last lines of its output ($log):"
    tail -n 40 "$log" >&2
    return 1
  fi
  rm -f "$log"
  say "  done: $what in $(( SECONDS - t0 )) s"
}


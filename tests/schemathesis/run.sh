#!/usr/bin/env bash
# Runs schemathesis (every check) against api/openapi.yaml, first on a
# `vmm serve` (no VM until a generated InstanceStart) and then on a
# `vmm run` (a booted guest). schemathesis speaks TCP, so proxy.py bridges
# to each VMM's Unix socket and restarts the VMM when a generated request
# stops it. Bounded: MAX_EXAMPLES per operation (default 25).
#
# usage: tests/schemathesis/run.sh VENV VMM-BINARY
set -euo pipefail

venv=$(realpath "${1:?usage: run.sh VENV VMM-BINARY}")
vmm=$(realpath "${2:?usage: run.sh VENV VMM-BINARY}")
here=$(cd "$(dirname "$0")" && pwd)
spec="$here/../../api/openapi.yaml"
max_examples=${MAX_EXAMPLES:-25}
work=$(mktemp -d "${TMPDIR:-/tmp}/vmm-schemathesis-XXXXXX")
proxy_pid=

cleanup() {
    # Stop the proxy we started (it stops the VMM it started), by PID.
    if [[ -n "$proxy_pid" ]] && kill -0 "$proxy_pid" 2>/dev/null; then
        kill -TERM "$proxy_pid" 2>/dev/null || true
        wait "$proxy_pid" 2>/dev/null || true
    fi
    proxy_pid=
}
trap 'cleanup; rm -rf "$work"' EXIT

run_against() {
    local name=$1
    shift
    local sock="$work/$name.sock"
    # The VMM's cwd is the scratch directory: relative log/metrics paths
    # that schemathesis generates land there.
    (cd "$work" && exec "$venv/bin/python" "$here/proxy.py" "$sock" -- "$vmm" "$@" --api-sock "$sock") \
        >"$work/$name.port" 2>"$work/$name.proxy.log" &
    proxy_pid=$!
    for _ in $(seq 300); do
        [[ -s "$work/$name.port" ]] && break
        sleep 0.1
    done
    local port
    port=$(head -1 "$work/$name.port")
    [[ -n "$port" ]] || { cat "$work/$name.proxy.log"; echo "proxy for $name did not start" >&2; exit 1; }
    echo "== schemathesis against vmm $name (max $max_examples examples per operation)"
    "$venv/bin/schemathesis" run "$spec" \
        --base-url "http://127.0.0.1:$port" \
        --checks all \
        --hypothesis-max-examples "$max_examples" \
        --hypothesis-deadline 5000 \
        --hypothesis-derandomize \
        --request-timeout 10000 \
        --no-color
    cleanup
}

run_against serve serve --serial none
run_against run run --serial none --mem-mib 64
echo "schemathesis: no failures"

#!/usr/bin/env bash
# Coalescing check of issue 5: N (2,000) concurrent requests for one cold key must cause exactly
# one upstream request, and every one of them must be answered (200 with the body).
#
#   bash benches/coalesce.sh
#
# Same setup as benches/load.sh (installs wrk/nginx-light/curl/python3 if missing, builds the
# release binary and examples/bench_origin.rs), all on 127.0.0.1. The fake origin answers after
# COALESCE_DELAY_MS (500) so the requests overlap, and counts what it receives (/__count).
# `bench_origin burst` opens N keep-alive connections, waits until all are connected, then sends
# one GET on each at once. The same burst against nginx proxy_cache (proxy_cache_lock on) is
# printed for reference, not asserted. Exit code 0 only if chatwoot-cache passes.
#
# Environment: N (2000), COALESCE_DELAY_MS (500), BENCH_SKIP_INSTALL=1, BENCH_SKIP_BUILD=1,
# BENCH_KEEP_WORK=1.
set -euo pipefail

# shellcheck source=load/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/load/lib.sh"

N=${N:-2000}
DELAY_MS=${COALESCE_DELAY_MS:-500}
RESULTS_DIR="$BENCH_DIR/results"

bench_init
if [[ -z "${BENCH_SKIP_INSTALL:-}" ]]; then
    ensure_tools wrk:wrk nginx:nginx-light curl:curl python3:python3 setsid:util-linux
fi
if [[ -z "${BENCH_SKIP_BUILD:-}" ]]; then
    build_binaries
else
    PROXY_BIN="$ROOT_DIR/target/release/chatwoot-cache"
    ORIGIN_BIN="$ROOT_DIR/target/release/examples/bench_origin"
fi
log "open files limit: $(ulimit -n)"
(( $(ulimit -n) >= N + 100 )) || die "ulimit -n is $(ulimit -n); need more than $N (raise the hard limit)"

mapfile -t PORTS < <(pick_ports 5)
ORIGIN_PORT=${PORTS[0]} PROXY_PORT=${PORTS[1]} PROXY_ADMIN_PORT=${PORTS[2]}
NGINX_CACHE_PORT=${PORTS[3]} NGINX_PASS_PORT=${PORTS[4]}

start_origin origin "$ORIGIN_PORT" --delay-ms "$DELAY_MS"
start_proxy proxy "$ORIGIN_PORT" "$PROXY_PORT" "$PROXY_ADMIN_PORT" --log-level warn --cache-ttl 1h
PROXY_PID=$LAST_PID
start_nginx "$ORIGIN_PORT" "$NGINX_CACHE_PORT" "$NGINX_PASS_PORT" 1h

TOKEN=$(printf 'bench%019d' 1)

# burst PORT CONVERSATION : prints "upstream_requests client_exit_code json"
burst() {
    local port=$1 conv=$2 before after out rc=0
    before=$(origin_count "$ORIGIN_PORT" conversation) || exit 1
    out=$("$ORIGIN_BIN" burst --url "http://127.0.0.1:$port/api/v1/accounts/1/conversations/$conv" \
        --token "$TOKEN" --n "$N" --timeout-ms 60000) || rc=$?
    sleep 0.2
    after=$(origin_count "$ORIGIN_PORT" conversation) || exit 1
    echo "$((after - before)) $rc $out"
}

log "$N concurrent GETs of one cold conversation through chatwoot-cache (origin delay ${DELAY_MS} ms)"
read -r P_UP P_RC P_JSON <<<"$(burst "$PROXY_PORT" 777001)"
kill -0 "$PROXY_PID" 2>/dev/null || die "chatwoot-cache exited during the burst (log: $WORK/proxy.log)"
COALESCED=$(curl -s --max-time 2 "http://127.0.0.1:$PROXY_ADMIN_PORT/metrics" |
    awk '/^chatwoot_cache_coalesced_total/ {print $2}' || true)

log "the same burst through nginx proxy_cache (proxy_cache_lock on), for reference"
read -r N_UP N_RC N_JSON <<<"$(burst "$NGINX_CACHE_PORT" 777002)"

mkdir -p "$RESULTS_DIR"
P_PASS=no
[[ "$P_UP" -eq 1 && "$P_RC" -eq 0 ]] && P_PASS=yes
{
    echo "# Coalescing: $N concurrent requests for one cold key ($(date -u +%Y-%m-%dT%H:%M:%SZ))"
    echo
    echo "Machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), kernel $(uname -sr). Origin delay ${DELAY_MS} ms."
    echo
    echo "| target | upstream requests | all $N answered 200 | client result |"
    echo "|---|---:|---|---|"
    echo "| chatwoot-cache | $P_UP | $([[ $P_RC -eq 0 ]] && echo yes || echo '**no**') | \`$P_JSON\` |"
    echo "| nginx proxy_cache + proxy_cache_lock | $N_UP | $([[ $N_RC -eq 0 ]] && echo yes || echo '**no**') | \`$N_JSON\` |"
    echo
    echo "chatwoot-cache: chatwoot_cache_coalesced_total = ${COALESCED:-?}. Goal: exactly 1 upstream request and every request answered → **$( [[ $P_PASS == yes ]] && echo PASS || echo FAIL )**."
} >"$RESULTS_DIR/coalesce-latest.md"
cat "$RESULTS_DIR/coalesce-latest.md"
[[ $P_PASS == yes ]] || { BENCH_KEEP_WORK=1; die "coalescing check failed: $P_UP upstream request(s), client exit $P_RC"; }

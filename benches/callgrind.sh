#!/usr/bin/env bash
# Instructions per request of chatwoot-cache under load, counted by valgrind's callgrind.
#
#   bash benches/callgrind.sh [hit|hit-gzip|hit-plain|hit-due|hit-redis|miss|fill|fill-gzip|floor|both|all|fairness]
#       (default: both = hit miss; all = hit hit-gzip hit-redis miss floor;
#       fairness = hit-plain hit hit-due)
#
# Instruction counts do not depend on how busy the machine is, unlike the CPU times of
# benches/load.sh: this is how the hot paths were profiled and how a change to them is judged
# (README, Performance). Installs valgrind and wrk if missing, builds release, starts the fake
# origin (bench_origin) and the proxy under callgrind on 127.0.0.1, warms it with wrk, counts
# only while a second wrk run of SECONDS (default 5) is going, and prints instructions per
# request (proxy requests from its own /metrics; `hit-gzip` is the hit of a client sending
# `Accept-Encoding: gzip`, served the stored gzip bytes; for `floor`, the bare hyper floor of
# benches/load.sh under the hit workload, requests as wrk counted them). `hit-plain` and
# `hit-due` are the hit with SPEC 12's features off (no refresh-ahead, no fair slots) and with
# them at their most expensive on a hit (rate limit on; refresh-ahead 0.0003 with one upstream
# slot: from 1.1 s after it is stored every entry is hot and due and its refresh has been tried
# and refused, as no slot outside the last quarter exists, so each hit reads both flags and no
# refresh ever runs during the count); `hit` has the defaults (fair slots on, refresh-ahead
# 0.8, not yet due). `hit-redis` is `hit` with the shared tier on (--redis-url to a
# redis-server of the script's own): an L1 hit must cost what it costs without Redis.
# `fill` and `fill-gzip` are the stored miss (SPEC 14's cold fill: fetch, JSON check, digest,
# compression, insert) of identity and gzip clients: `bench_origin walk` over FILL_TOKENS
# (default 20) x 100 distinct conversations of account 1, after a warm-up walk over account 2;
# counted while the walk runs. Valgrind hides SHA-NI, so the HMAC and the
# SHA-256 ETag weigh more here than on the real CPU.
#
# Environment: SECONDS_MEASURED (5), FILL_TOKENS (20), BENCH_SKIP_INSTALL=1, BENCH_SKIP_BUILD=1,
# BENCH_KEEP_WORK=1 (keep the callgrind.out files; inspect with callgrind_annotate).
set -euo pipefail

# shellcheck source=load/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/load/lib.sh"

MODES=${1:-both}
SECS=${SECONDS_MEASURED:-5}
[[ "$MODES" == both ]] && MODES="hit miss"
[[ "$MODES" == all ]] && MODES="hit hit-gzip hit-redis miss floor"
[[ "$MODES" == fairness ]] && MODES="hit-plain hit hit-due"

bench_init
if [[ -z "${BENCH_SKIP_INSTALL:-}" ]]; then
    ensure_tools valgrind:valgrind callgrind_control:valgrind wrk:wrk curl:curl python3:python3 setsid:util-linux
    [[ " $MODES " == *" hit-redis "* ]] && ensure_tools redis-server:redis-server redis-cli:redis-tools
fi
if [[ -z "${BENCH_SKIP_BUILD:-}" ]]; then
    build_binaries
else
    PROXY_BIN="$ROOT_DIR/target/release/chatwoot-cache"
    ORIGIN_BIN="$ROOT_DIR/target/release/examples/bench_origin"
fi

requests_total() {   # requests_total ADMIN_PORT : sum of chatwoot_cache_requests_total
    curl -s --max-time 5 "http://127.0.0.1:$1/metrics" |
        awk '/^chatwoot_cache_requests_total/ {s += $2} END {printf "%d\n", s}'
}

for mode in $MODES; do
    mapfile -t PORTS < <(pick_ports 3)
    ORIGIN_PORT=${PORTS[0]} PROXY_PORT=${PORTS[1]} ADMIN_PORT=${PORTS[2]}
    start_origin "origin-$mode" "$ORIGIN_PORT" --threads 1
    OUT="$WORK/callgrind.$mode.out"
    wrk_mode=$mode accept="" flags=()
    case $mode in
        hit-gzip) wrk_mode=hit accept=gzip ;;
        hit-plain) wrk_mode=hit flags=(--refresh-ahead 0 --upstream-max-in-flight-per-token 0) ;;
        hit-due) wrk_mode=hit flags=(--refresh-ahead 0.0003 --upstream-max-in-flight 1
            --rate-limit-per-token 100/s --rate-limit-burst 1000) ;;
        hit-redis)
            wrk_mode=hit
            if [[ -z "${REDIS_PORT:-}" ]]; then
                REDIS_PORT=$(pick_ports 1)
                start_bg redis redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' \
                    --appendonly no
                for _ in $(seq 100); do
                    [[ "$(redis-cli -p "$REDIS_PORT" ping 2>/dev/null)" == PONG ]] && break
                    sleep 0.1
                done
            fi
            flags=(--redis-url "redis://127.0.0.1:$REDIS_PORT"
                --scope-secret callgrind-bench-scope-secret-0123456789abcdef) ;;
    esac
    if [[ $mode == floor ]]; then
        wrk_mode=hit
        start_bg "floor" valgrind --tool=callgrind --callgrind-out-file="$OUT" --dump-instr=no \
            --instr-atstart=no "$ORIGIN_BIN" floor --listen "127.0.0.1:$PROXY_PORT"
        ready_url="http://127.0.0.1:$PROXY_PORT/"
    else
        start_bg "proxy-$mode" valgrind --tool=callgrind --callgrind-out-file="$OUT" --dump-instr=no \
            --instr-atstart=no "$PROXY_BIN" --upstream "http://127.0.0.1:$ORIGIN_PORT" \
            --listen "127.0.0.1:$PROXY_PORT" --admin-listen "127.0.0.1:$ADMIN_PORT" \
            --log-level warn --cache-ttl 1h --cache-max-bytes 1GiB "${flags[@]}"
        ready_url="http://127.0.0.1:$ADMIN_PORT/healthz"
    fi
    VG_PID=$LAST_PID
    for _ in $(seq 300); do
        curl -s -o /dev/null --max-time 1 "$ready_url" && break
        sleep 0.2
    done
    if [[ $mode == fill* ]]; then
        walk=("$ORIGIN_BIN" walk --base "http://127.0.0.1:$PROXY_PORT" --tokens "${FILL_TOKENS:-20}"
            --convs 100 --concurrency 16)
        [[ $mode == fill-gzip ]] && walk+=(--accept-encoding gzip)
        log "$mode: warming (account 2), then counting stored misses (account 1)"
        "${walk[@]}" --account 2 >/dev/null
        before=$(requests_total "$ADMIN_PORT")
        up_before=$(origin_count "$ORIGIN_PORT")
        callgrind_control -i on "$VG_PID" >/dev/null
        "${walk[@]}" --account 1 >"$WORK/walk.$mode.txt"
        callgrind_control -i off "$VG_PID" >/dev/null
    else
        log "$mode: warming (2 s), then counting for ${SECS}s"
        BENCH_MODE=$wrk_mode BENCH_ACCEPT_ENCODING=$accept wrk -t1 -c8 -d2s -s "$LOAD_DIR/wrk.lua" "http://127.0.0.1:$PROXY_PORT" >/dev/null
        [[ $mode == floor ]] || before=$(requests_total "$ADMIN_PORT")
        up_before=$(origin_count "$ORIGIN_PORT")
        callgrind_control -i on "$VG_PID" >/dev/null
        BENCH_MODE=$wrk_mode BENCH_ACCEPT_ENCODING=$accept wrk -t1 -c16 -d"${SECS}s" -s "$LOAD_DIR/wrk.lua" \
            "http://127.0.0.1:$PROXY_PORT" >"$WORK/wrk.$mode.txt"
        callgrind_control -i off "$VG_PID" >/dev/null
    fi
    up=$(($(origin_count "$ORIGIN_PORT") - up_before))
    if [[ $mode == floor ]]; then
        n=$(grep -o '"requests":[0-9]*' "$WORK/wrk.$mode.txt" | cut -d: -f2)
    else
        # the /metrics scrape after counting stopped is not counted; the one before was
        after=$(requests_total "$ADMIN_PORT")
        n=$((after - before - 1))
    fi
    callgrind_control -d "$VG_PID" >/dev/null
    sleep 1
    # callgrind_control -d writes "$OUT.1" (the counted part); the exit dump "$OUT" is empty
    dump="$OUT.1"
    [[ -s "$dump" ]] || dump="$OUT"
    # (awk reads to the end: exiting early would SIGPIPE callgrind_annotate under pipefail)
    total=$(callgrind_annotate "$dump" 2>/dev/null |
        awk '/PROGRAM TOTALS/ && !seen {gsub(",", "", $1); print $1; seen = 1}')
    [[ -n "$total" && $n -gt 0 ]] || die "no callgrind totals for $mode (see $WORK)"
    printf '%s: %d requests, %d instructions, %d instructions per request (upstream requests meanwhile: %d)\n' \
        "$mode" "$n" "$total" $((total / n)) "$up"
    kill -TERM -- "-$VG_PID" 2>/dev/null || true
done

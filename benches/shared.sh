#!/usr/bin/env bash
# The shared tier across replicas (SPEC 11, issue 12), measured: the same polling workload with
# writes mixed in, through 1 and 3 proxy replicas, without and with Redis, in one run.
#
#   bash benches/shared.sh
#
# Starts, all on 127.0.0.1: the fake Chatwoot of examples/bench_origin.rs (~8 KB conversations,
# a write route that moves a conversation on), a redis-server of its own (free port, no
# persistence, maxmemory 256mb allkeys-lru), and for each of four phases fresh release builds of
# chatwoot-cache (1 or 3 replicas; with Redis: --redis-url, one --scope-secret, a key prefix per
# phase). examples/shared_load.rs drives each phase: a polling workload (TOKENS tokens x CONVS
# conversations, RATE requests/s in all, each request to the next replica in turn), writes
# (WRITE_RATE/s, random conversation, write-through), and propagation probes (a write through one
# replica, then reads through the others until they return the new version). Each phase warms
# for WARMUP_S seconds, then counts for DURATION_S seconds. Two more phases with 3 replicas and
# Redis put a fault in the counted window, FAULT_AT_S seconds in, for FAULT_S seconds: Redis
# paused (SIGSTOP, then SIGCONT), and Redis killed (SIGKILL, then a fresh empty redis-server on
# the same port). Output: benches/results/shared-latest.md.
#
# What is reported per phase: hit ratio (X-Cache HIT / requests), answered from a cache (HIT,
# STALE or REVALIDATED), upstream requests per client request (the origin's conversation GETs
# over client GETs, measured over the same window), and write->read propagation p50/p99 across
# replicas (see examples/shared_load.rs for what a sample is), plus what the proxies' metrics say
# about the shared tier (L2 reads by result, Redis errors, bus messages).
#
# Environment: TOKENS (100), CONVS (40), RATE (2000), CONNECTIONS (16), WRITE_RATE (1),
# PROBERS (32), WARMUP_S (5), DURATION_S (20), CACHE_TTL (10s), FAULT_AT_S (5), FAULT_S (8),
# BENCH_SKIP_INSTALL=1,
# BENCH_SKIP_BUILD=1, BENCH_KEEP_WORK=1.
set -euo pipefail

# shellcheck source=load/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/load/lib.sh"

TOKENS=${TOKENS:-100}
CONVS=${CONVS:-40}
RATE=${RATE:-2000}
CONNECTIONS=${CONNECTIONS:-16}
WRITE_RATE=${WRITE_RATE:-1}
PROBERS=${PROBERS:-32}
WARMUP_S=${WARMUP_S:-5}
DURATION_S=${DURATION_S:-20}
CACHE_TTL=${CACHE_TTL:-10s}
FAULT_AT_S=${FAULT_AT_S:-5}
FAULT_S=${FAULT_S:-8}
RESULTS_DIR="$BENCH_DIR/results"
PROBE_ACCOUNT=2
# The same on every replica (at least 32 bytes); a bench value, not a secret.
SCOPE_SECRET=shared-bench-scope-secret-0123456789abcdef

bench_init
if [[ -z "${BENCH_SKIP_INSTALL:-}" ]]; then
    ensure_tools curl:curl python3:python3 setsid:util-linux redis-server:redis-server redis-cli:redis-tools
fi
if [[ -z "${BENCH_SKIP_BUILD:-}" ]]; then
    build_binaries
    log "cargo build --release --locked --example shared_load"
    (cd "$ROOT_DIR" && timeout "$BUILD_TIMEOUT" cargo build --release --locked --example shared_load) ||
        die "cargo build of examples/shared_load failed"
fi
PROXY_BIN=${PROXY_BIN:-"$ROOT_DIR/target/release/chatwoot-cache"}
ORIGIN_BIN=${ORIGIN_BIN:-"$ROOT_DIR/target/release/examples/bench_origin"}
LOAD_BIN="$(dirname "$ORIGIN_BIN")/shared_load"
[[ -x "$PROXY_BIN" && -x "$ORIGIN_BIN" && -x "$LOAD_BIN" ]] || die "release binaries missing (build first)"

mapfile -t PORTS < <(pick_ports 8)
ORIGIN_PORT=${PORTS[0]} REDIS_PORT=${PORTS[1]}
PROXY_PORTS=("${PORTS[2]}" "${PORTS[3]}" "${PORTS[4]}")
ADMIN_PORTS=("${PORTS[5]}" "${PORTS[6]}" "${PORTS[7]}")

start_origin origin "$ORIGIN_PORT" --probe-account "$PROBE_ACCOUNT"

REDIS_STARTS=0
start_redis() {   # (re)starts the redis-server on REDIS_PORT; sets REDIS_PID (its process group)
    REDIS_STARTS=$((REDIS_STARTS + 1))
    start_bg "redis-$REDIS_STARTS" redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' \
        --appendonly no --maxmemory 256mb --maxmemory-policy allkeys-lru
    REDIS_PID=$LAST_PID
    for _ in $(seq 100); do
        [[ "$(redis-cli -p "$REDIS_PORT" ping 2>/dev/null)" == PONG ]] && return 0
        sleep 0.1
    done
    die "redis-server did not start (log: $WORK/redis-$REDIS_STARTS.log)"
}
start_redis

TTL_MS=$(python3 -c "import sys; v=sys.argv[1]; print(int(float(v[:-2])) if v.endswith('ms') else int(float(v[:-1]) * {'s':1000,'m':60000,'h':3600000}[v[-1]]))" "$CACHE_TTL")

# metric_sum ADMIN_PORT REGEX : sum of the samples whose line matches REGEX.
metric_sum() {
    curl -s --max-time 2 "http://127.0.0.1:$1/metrics" |
        awk -v re="$2" '$0 ~ re && $0 !~ /^#/ {s += $NF} END {printf "%d", s}'
}

# phase NAME REPLICAS REDIS(0|1) [FAULT(pause|kill)] : starts the replicas, runs the load (with
# the fault in the counted window), stops them; appends one JSON line (the load client's, plus
# the proxies' shared-tier metrics) to $WORK/phases.jsonl.
phase() {
    local name=$1 n=$2 redis=$3 fault=${4:-none} i bases="" pids=() extra=()
    if [[ $redis == 1 ]]; then
        extra=(--redis-url "redis://127.0.0.1:$REDIS_PORT" --scope-secret "$SCOPE_SECRET"
            --redis-key-prefix "bench-$name:")
    fi
    for ((i = 0; i < n; i++)); do
        start_proxy "$name-$i" "$ORIGIN_PORT" "${PROXY_PORTS[$i]}" "${ADMIN_PORTS[$i]}" \
            --log-level warn --cache-ttl "$CACHE_TTL" "${extra[@]}"
        pids+=("$LAST_PID")
        bases+="${bases:+,}http://127.0.0.1:${PROXY_PORTS[$i]}"
    done
    if [[ $redis == 1 ]]; then
        # The bus subscription is up once bus metrics exist with redis_up 1.
        for ((i = 0; i < n; i++)); do
            for _ in $(seq 100); do
                [[ "$(metric_sum "${ADMIN_PORTS[$i]}" '^chatwoot_cache_redis_up')" == 1 ]] && break
                sleep 0.1
            done
        done
    fi
    log "phase $name: $n replica(s), Redis $([[ $redis == 1 ]] && echo on || echo off): ${WARMUP_S}s warm-up + ${DURATION_S}s measured"
    local out load_pid
    "$LOAD_BIN" --bases "$bases" --origin "http://127.0.0.1:$ORIGIN_PORT" --tokens "$TOKENS" \
        --convs "$CONVS" --rate "$RATE" --connections "$CONNECTIONS" --write-rate "$WRITE_RATE" \
        --probe-account "$PROBE_ACCOUNT" --probers "$PROBERS" --ttl-ms "$TTL_MS" \
        --warmup-s "$WARMUP_S" --duration-s "$DURATION_S" >"$WORK/load-$name.json" &
    load_pid=$!
    case $fault in
        pause)
            sleep $((WARMUP_S + FAULT_AT_S))
            log "phase $name: Redis paused (SIGSTOP) for ${FAULT_S}s"
            kill -STOP -- "-$REDIS_PID"
            sleep "$FAULT_S"
            kill -CONT -- "-$REDIS_PID"
            log "phase $name: Redis resumed"
            ;;
        kill)
            sleep $((WARMUP_S + FAULT_AT_S))
            log "phase $name: Redis killed (SIGKILL) for ${FAULT_S}s"
            kill -KILL -- "-$REDIS_PID"
            sleep "$FAULT_S"
            start_redis
            log "phase $name: a fresh redis-server on the same port"
            ;;
    esac
    wait "$load_pid" || die "load client failed in phase $name"
    out=$(cat "$WORK/load-$name.json")
    local l2_hit=0 l2_miss=0 l2_err=0 l2_skip=0 rerr=0 sent=0 recv=0 coalesced=0 a
    for ((i = 0; i < n; i++)); do
        a=${ADMIN_PORTS[$i]}
        kill -0 "${pids[$i]}" 2>/dev/null || die "replica $name-$i exited (log: $WORK/$name-$i.log)"
        l2_hit=$((l2_hit + $(metric_sum "$a" '^chatwoot_cache_l2_requests_total\{result="hit"')))
        l2_miss=$((l2_miss + $(metric_sum "$a" '^chatwoot_cache_l2_requests_total\{result="miss"')))
        l2_err=$((l2_err + $(metric_sum "$a" '^chatwoot_cache_l2_requests_total\{result="error"')))
        l2_skip=$((l2_skip + $(metric_sum "$a" '^chatwoot_cache_l2_requests_total\{result="skipped"')))
        rerr=$((rerr + $(metric_sum "$a" '^chatwoot_cache_redis_errors_total')))
        sent=$((sent + $(metric_sum "$a" '^chatwoot_cache_bus_messages_total\{direction="sent"')))
        recv=$((recv + $(metric_sum "$a" '^chatwoot_cache_bus_messages_total\{direction="received"')))
        coalesced=$((coalesced + $(metric_sum "$a" '^chatwoot_cache_coalesced_total')))
    done
    for i in "${pids[@]}"; do kill -TERM -- "-$i" 2>/dev/null || true; done
    for i in "${pids[@]}"; do
        for _ in $(seq 50); do kill -0 -- "-$i" 2>/dev/null || break; sleep 0.1; done
    done
    printf '%s\n' "${out%\}},\"name\":\"$name\",\"redis\":$redis,\"fault\":\"$fault\",\"l2\":{\"hit\":$l2_hit,\"miss\":$l2_miss,\"error\":$l2_err,\"skipped\":$l2_skip},\"redis_errors\":$rerr,\"bus\":{\"sent\":$sent,\"received\":$recv},\"coalesced\":$coalesced}" \
        >>"$WORK/phases.jsonl"
    log "phase $name: $out"
}

START=$(date -u +%Y-%m-%dT%H:%M:%SZ)
phase one-local 1 0
phase three-local 3 0
phase one-redis 1 1
phase three-redis 3 1
phase three-redis-paused 3 1 pause
phase three-redis-killed 3 1 kill

mkdir -p "$RESULTS_DIR"
COMMIT=$(cd "$ROOT_DIR" && git rev-parse --short HEAD 2>/dev/null || echo unknown)
python3 - "$WORK/phases.jsonl" "$RESULTS_DIR/shared-latest.md" <<PY
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def pct(v): return "" if v is None else f"{100 * v:.1f}%"
def redis_col(r):
    return {"none": "yes" if r["redis"] else "no", "pause": "paused ${FAULT_S} s",
            "kill": "killed, restarted ${FAULT_S} s later"}[r.get("fault", "none")]
def num(v, f="{:.3f}"): return "" if v is None else f.format(v)
out = []
out.append("# Shared tier: 1 and 3 replicas, without and with Redis ($START, \`$COMMIT\`)")
out.append("")
out.append("Machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), kernel $(uname -sr), $(redis-server --version | cut -d' ' -f3).")
out.append("Workload per phase: ${TOKENS} tokens x ${CONVS} conversations polled at ${RATE} requests/s in all over "
           "${CONNECTIONS} connections per replica set, each request to the next replica in turn; ${WRITE_RATE} write/s "
           "to a random polled conversation; ${PROBERS} propagation probers; --cache-ttl ${CACHE_TTL}, other settings "
           "default (stale-while-revalidate 30s, refresh-ahead 0.8); ${WARMUP_S}s warm-up, then ${DURATION_S}s measured.")
out.append("")
out.append("| replicas | Redis | client GETs | req/s | hit ratio | from a cache (HIT+STALE+REVALIDATED) | upstream req / client req | non-200 / errors | latency p50 / p99 / max | propagation p50 | p99 | max | samples (timeouts) |")
out.append("|---:|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|")
for r in rows:
    p = r["propagation"]
    non200 = sum(v for k, v in r["statuses"].items() if k != "200") + sum(r["errors"].values())
    prop = (lambda k: "n/a (one replica)") if r["replicas"] == 1 else (lambda k: "" if p[k] is None else f"{p[k]:.2f} ms")
    lat = r["latency"]
    out.append(f"| {r['replicas']} | {redis_col(r)} | {r['requests']} | {r['rate']:.0f} | {pct(r['hit_ratio'])} | "
               f"{pct(r['cache_answered_ratio'])} | {num(r['upstream_per_request'])} | {non200} | "
               f"{lat['p50_ms']:.2f} / {lat['p99_ms']:.2f} / {lat['max_ms']:.1f} ms | {prop('p50_ms')} | {prop('p99_ms')} | "
               f"{prop('max_ms')} | {'' if r['replicas'] == 1 else str(p['samples']) + ' (' + str(p['timeouts']) + ')'} |")
out.append("")
out.append("X-Cache counts, writes, and what the proxies' metrics say about the shared tier (summed over the replicas of the phase, whole phase):")
out.append("")
out.append("| replicas | Redis | X-Cache | writes (errors) | L2 reads hit / miss / error / skipped | Redis errors | bus sent / received | coalesced |")
out.append("|---:|---|---|---:|---|---:|---|---:|")
for r in rows:
    xc = ", ".join(f"{k} {v}" for k, v in sorted(r["x_cache"].items()))
    l2 = r["l2"]
    out.append(f"| {r['replicas']} | {redis_col(r)} | {xc} | {r['writes']} ({r['write_errors']}) | "
               f"{l2['hit']} / {l2['miss']} / {l2['error']} / {l2['skipped']} | {r['redis_errors']} | {r['bus']['sent']} / {r['bus']['received']} | {r['coalesced']} |")
out.append("")
out.append("Propagation: time from a write's response through one replica to the start of the first read through another "
           "replica that returned the written version (an upper bound; reads back to back for 2 ms, then every tenth of the "
           "time elapsed); one sample per write and other replica. Without Redis the other replicas keep their copy until "
           "its freshness ends (refresh-ahead or stale-while-revalidate then fetches the new one). Latency: from a polling "
           "request's scheduled start to its whole answer. Fault phases: the fault starts ${FAULT_AT_S} s into the "
           "${DURATION_S} s counted window and lasts ${FAULT_S} s; --redis-timeout is the default 50 ms.")
open(sys.argv[2], "w").write("\n".join(out) + "\n")
PY
cp "$WORK/phases.jsonl" "$RESULTS_DIR/shared-latest.jsonl"
cat "$RESULTS_DIR/shared-latest.md"

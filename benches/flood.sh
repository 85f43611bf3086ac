#!/usr/bin/env bash
# Fairness under a flood (issue 13, SPEC 12): one runaway token floods cold misses at a slow
# upstream while four polite tokens read cold conversations one at a time. Same run, same
# origin, the proxy restarted for each configuration:
#
#   alone     polite tokens only, fairness on: the floor their latency is compared with
#   off       the flood, --upstream-max-in-flight-per-token 0 and no rate limit (one FIFO queue)
#   fair      the flood, fair slots on (the default share: a quarter of the slots)
#   fair+rate the flood, fair slots and --rate-limit-per-token FLOOD_RATE (default 20/s)
#
#   bash benches/flood.sh
#
# Reports, per configuration: the polite tokens' success rate (200s) and latency p50/p99/max,
# the flood's requests and shed share (503 token_quota/queue_timeout + 429 rate_limited), the
# proxy's shed_total by reason and the requests the upstream received. Latency ratios are taken
# against `alone` of the same run (this machine is shared: never compare across runs).
#
# Setup (benches/load/lib.sh): release build of the proxy and examples/bench_origin, all on
# 127.0.0.1. The origin answers every request after FLOOD_DELAY_MS (200). The proxy runs with
# --upstream-max-in-flight 32 (fair share 8), --upstream-queue-timeout 1s, --log-level warn.
# The client is `bench_origin flood`: 400 flood connections, each at most one request per
# 400 ms (up to 1,000 cold misses a second), and 4 polite tokens, each one cold miss at a time
# with 100 ms between them. Every token makes one request first, so the upstream has accepted
# it and it is a scope of its own (all clients share one address).
#
# Environment: FLOOD_SECONDS (15 per configuration), FLOOD_DELAY_MS (200), FLOOD_RATE (20/s),
# FLOOD_CONNECTIONS (400), BENCH_SKIP_INSTALL=1, BENCH_SKIP_BUILD=1, BENCH_KEEP_WORK=1.
set -euo pipefail

# shellcheck source=load/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/load/lib.sh"

SECS=${FLOOD_SECONDS:-15}
DELAY_MS=${FLOOD_DELAY_MS:-200}
RATE=${FLOOD_RATE:-20/s}
CONNS=${FLOOD_CONNECTIONS:-400}
RESULTS_DIR="$BENCH_DIR/results"

bench_init
if [[ -z "${BENCH_SKIP_INSTALL:-}" ]]; then
    ensure_tools curl:curl python3:python3 setsid:util-linux
fi
if [[ -z "${BENCH_SKIP_BUILD:-}" ]]; then
    build_binaries
else
    PROXY_BIN="$ROOT_DIR/target/release/chatwoot-cache"
    ORIGIN_BIN="$ROOT_DIR/target/release/examples/bench_origin"
fi

mapfile -t PORTS < <(pick_ports 3)
ORIGIN_PORT=${PORTS[0]} PROXY_PORT=${PORTS[1]} ADMIN_PORT=${PORTS[2]}
start_origin origin "$ORIGIN_PORT" --delay-ms "$DELAY_MS"

COMMON=(--log-level warn --upstream-max-in-flight 32 --upstream-queue-timeout 1s --cache-ttl 1h
    --shutdown-timeout 1s)

shed_by_reason() {   # "reason=n ..." from the proxy's /metrics
    curl -s --max-time 5 "http://127.0.0.1:$ADMIN_PORT/metrics" |
        awk -F'[{}"= ]+' '/^chatwoot_cache_shed_total\{/ {printf "%s=%d ", $3, $NF}' || true
}

# run NAME FLOOD_CONNECTIONS FIRST_CONV [proxy flags] : one configuration, one JSON line in $WORK
run() {
    local name=$1 conns=$2 first=$3 before after shed
    shift 3
    start_proxy "proxy-$name" "$ORIGIN_PORT" "$PROXY_PORT" "$ADMIN_PORT" "${COMMON[@]}" "$@"
    local pid=$LAST_PID
    before=$(origin_count "$ORIGIN_PORT" conversation)
    log "$name: ${SECS}s, $conns flood connections, proxy flags: $*"
    "$ORIGIN_BIN" flood --base "http://127.0.0.1:$PROXY_PORT" --duration-ms $((SECS * 1000)) \
        --flood-connections "$conns" --first-conv "$first" >"$WORK/flood.$name.json" ||
        die "the flood client failed for $name (see $WORK)"
    after=$(origin_count "$ORIGIN_PORT" conversation)
    shed=$(shed_by_reason)
    kill -0 "$pid" 2>/dev/null || die "chatwoot-cache exited during $name (log: $WORK/proxy-$name.log)"
    kill -TERM -- "-$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    python3 - "$WORK/flood.$name.json" "$name" "$((after - before))" "$shed" "$*" <<'PY' >>"$WORK/rows.jsonl"
import json, sys
r = json.load(open(sys.argv[1]))
r.update(name=sys.argv[2], upstream=int(sys.argv[3]), shed=sys.argv[4].strip(), flags=sys.argv[5])
print(json.dumps(r))
PY
}

run alone 0 10000000
run off "$CONNS" 20000000 --upstream-max-in-flight-per-token 0
run fair "$CONNS" 30000000
run fair+rate "$CONNS" 40000000 --rate-limit-per-token "$RATE"

mkdir -p "$RESULTS_DIR"
REV=$(cd "$ROOT_DIR" && git rev-parse --short HEAD 2>/dev/null || echo unknown)
python3 - "$WORK/rows.jsonl" "$SECS" "$DELAY_MS" "$CONNS" "$REV" <<'PY' >"$RESULTS_DIR/flood-latest.md"
import json, sys, subprocess, datetime, platform, os
rows = [json.loads(l) for l in open(sys.argv[1])]
secs, delay, conns, rev = sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
by = {r["name"]: r for r in rows}
floor = by["alone"]["polite"]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
print(f"# Fairness under a flood (`benches/flood.sh`, `{rev}`, {datetime.datetime.utcnow():%Y-%m-%dT%H:%M:%SZ})")
print()
print(f"Machine: {os.cpu_count()} CPUs, {cpu}, kernel {platform.release()}. Origin delay {delay} ms, "
      f"--upstream-max-in-flight 32, --upstream-queue-timeout 1s; {secs} s per configuration; "
      f"flood: {conns} connections of one token, each at most one cold miss per 400 ms; "
      "polite: 4 tokens, one cold miss at a time, 100 ms apart.")
print()
print("| configuration | polite requests | polite 200 | polite p50 ms | polite p99 ms | polite max ms | p99 / alone | flood requests | flood 200 | flood shed share | shed_total by reason | upstream requests |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|")
for r in rows:
    p, f = r["polite"], r["flood"]
    ratio = p["p99_ms"] / floor["p99_ms"] if floor["p99_ms"] else 0
    flood = (f"{f['requests']:,} | {f['ok_200']:,} | {f['shed_share']:.1%}" if f["requests"] else "– | – | –")
    print(f"| {r['name']} | {p['requests']:,} | {p['ok_share']:.1%} | {p['p50_ms']:.0f} | {p['p99_ms']:.0f} | "
          f"{p['max_ms']:.0f} | {ratio:.2f}× | {flood} | {r['shed'] or '–'} | {r['upstream']:,} |")
print()
print("Raw client output per configuration (status and X-Cache counts, errors):")
print()
for r in rows:
    print(f"- {r['name']} (`{r['flags'] or 'defaults'}`): polite `{json.dumps(r['polite'])}`, flood `{json.dumps(r['flood'])}`")
PY
cat "$RESULTS_DIR/flood-latest.md"

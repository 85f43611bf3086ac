#!/usr/bin/env bash
# Resident memory and capacity after filling the cache (issue 5: RSS after filling a 256 MiB
# cache must stay within 1.25x the configured bound; issue 15 / SPEC 14: conversations held,
# filled by gzip clients and by identity clients).
#
#   bash benches/rss.sh
#
# For each kind of client in ENCODINGS (default: "identity gzip"): starts the fake origin
# (bench_origin origin: ~8 KB conversations with Rails' header set) and a fresh chatwoot-cache
# with its default --cache-max-bytes (256 MiB) on 127.0.0.1, requests TOKENS x CONVS distinct
# conversations once each (bench_origin walk, with `Accept-Encoding: gzip` for the gzip fill;
# more than fit, so the cache fills and evicts), then reads the proxy's VmRSS/VmHWM from /proc
# and its stored_bytes/entries gauges. Prints and writes benches/results/rss-latest.md (one row
# per fill). Exit code 0 only if every fill's RSS <= 1.25x the bound.
#
# Environment: TOKENS (2000: 200k distinct conversations overfill the default 256 MiB for either
# kind of client), CONVS (100), CACHE_MAX_BYTES (256MiB; bytes or KiB/MiB/GiB),
# ENCODINGS ("identity gzip"), BENCH_SKIP_INSTALL=1, BENCH_SKIP_BUILD=1, BENCH_KEEP_WORK=1.
set -euo pipefail

# shellcheck source=load/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/load/lib.sh"

TOKENS=${TOKENS:-2000}
CONVS=${CONVS:-100}
CACHE_MAX_BYTES=${CACHE_MAX_BYTES:-256MiB}
ENCODINGS=${ENCODINGS:-identity gzip}
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

bound=$(python3 - "$CACHE_MAX_BYTES" <<'PY'
import re, sys
m = re.fullmatch(r"(\d+)\s*(|B|KiB|MiB|GiB)", sys.argv[1])
if not m:
    sys.exit("CACHE_MAX_BYTES: a number of bytes, or with KiB/MiB/GiB")
print(int(m.group(1)) * {"": 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}[m.group(2)])
PY
) || die "cannot read CACHE_MAX_BYTES=$CACHE_MAX_BYTES"

rows=() fills=() verdict=PASS
for encoding in $ENCODINGS; do
    case $encoding in
        identity) walk_flags=() ;;
        gzip) walk_flags=(--accept-encoding gzip) ;;
        *) die "ENCODINGS: identity and/or gzip, not $encoding" ;;
    esac
    mapfile -t PORTS < <(pick_ports 3)
    ORIGIN_PORT=${PORTS[0]} PROXY_PORT=${PORTS[1]} ADMIN_PORT=${PORTS[2]}
    start_origin "origin-$encoding" "$ORIGIN_PORT"
    ORIGIN_PID=$LAST_PID
    start_proxy "proxy-$encoding" "$ORIGIN_PORT" "$PROXY_PORT" "$ADMIN_PORT" --log-level warn \
        --cache-max-bytes "$CACHE_MAX_BYTES"
    PROXY_PID=$LAST_PID

    kib() { awk -v k="$1" '$1 == k":" {print $2}' "/proc/$PROXY_PID/status"; }
    gauge() {
        curl -s --max-time 5 "http://127.0.0.1:$ADMIN_PORT/metrics" |
            awk -v m="$1" '$1 == m {printf "%d\n", $2}'
    }
    rss_start=$(kib VmRSS)
    log "filling ($encoding clients): $TOKENS tokens x $CONVS conversations through a ${CACHE_MAX_BYTES} cache"
    walk=$(timeout 900 "$ORIGIN_BIN" walk --base "http://127.0.0.1:$PROXY_PORT" --tokens "$TOKENS" \
        --convs "$CONVS" --concurrency 64 "${walk_flags[@]}") || die "walk failed: $walk"
    sleep 2   # let moka's housekeeping apply the last inserts and evictions
    rss=$(kib VmRSS) hwm=$(kib VmHWM)
    stored=$(gauge chatwoot_cache_stored_bytes) entries=$(gauge chatwoot_cache_entries)
    ratio=$(python3 -c "print(f'{$rss * 1024 / $bound:.2f}')")
    peak_ratio=$(python3 -c "print(f'{$hwm * 1024 / $bound:.2f}')")
    per_entry=$(python3 -c "print($stored // max($entries, 1))")
    python3 -c "import sys; sys.exit(0 if $rss * 1024 <= 1.25 * $bound else 1)" || verdict=FAIL
    rows+=("$(printf '| %s | %s B | %s kB | %s kB (**%sx**) | %s kB (%sx) | **%s** | %s | %s B |' \
        "$encoding" "$bound" "$rss_start" "$rss" "$ratio" "$hwm" "$peak_ratio" "$entries" \
        "$stored" "$per_entry")")
    fills+=("$(printf -- '- %s: `bench_origin walk --tokens %s --convs %s --concurrency 64 %s` → `%s`' \
        "$encoding" "$TOKENS" "$CONVS" "${walk_flags[*]}" "$walk")")
    for pid in "$PROXY_PID" "$ORIGIN_PID"; do
        kill -TERM -- "-$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 -- "-$pid" 2>/dev/null || break; sleep 0.1; done
    done
done

mkdir -p "$RESULTS_DIR"
{
    printf '# RSS and conversations held after filling the cache (%s)\n\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    printf 'Machine: %s CPUs, %s, kernel %s. git %s.\n\n' "$(nproc)" \
        "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')" "$(uname -sr)" \
        "$(cd "$ROOT_DIR" && git describe --always --dirty 2>/dev/null || echo unknown)"
    printf '| clients | bound | RSS at start | RSS after the fill | peak RSS | entries held | stored bytes | weight per entry |\n'
    printf '|---|---:|---:|---:|---:|---:|---:|---:|\n'
    printf '%s\n' "${rows[@]}"
    printf '\nFills:\n'
    printf '%s\n' "${fills[@]}"
    printf '\nGoal: RSS after every fill ≤ 1.25x the bound → **%s**.\n' "$verdict"
} >"$RESULTS_DIR/rss-latest.md"
cat "$RESULTS_DIR/rss-latest.md"
[[ $verdict == PASS ]]

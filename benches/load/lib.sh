# shellcheck shell=bash
# Shared helpers for benches/load.sh and benches/coalesce.sh. Sourced, not run.
# Everything started here runs on 127.0.0.1 in its own process group and is stopped by
# bench_cleanup (installed as an EXIT trap by bench_init).

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)   # benches/
ROOT_DIR=$(dirname "$BENCH_DIR")
LOAD_DIR="$BENCH_DIR/load"
BENCH_PIDS=()          # process-group leaders we started (setsid)
NGINX_PREFIX=""        # set when nginx was started
WORK=""

# Upper bounds on the steps that do not measure anything, so a script never hangs on them.
INSTALL_TIMEOUT=${INSTALL_TIMEOUT:-900}   # each apt-get / pip call, seconds
BUILD_TIMEOUT=${BUILD_TIMEOUT:-3600}      # the release build (a first build on 2 cores: ~10 min)

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

bench_init() {
    # tmpfs when there is one: nginx's cache is files (800 MB for the many-tokens workload);
    # on a slow disk, writing back and deleting them would be measured and take minutes.
    local base=${TMPDIR:-/tmp}
    [[ -z "${TMPDIR:-}" && -d /dev/shm && -w /dev/shm ]] && base=/dev/shm
    WORK=$(mktemp -d "$base/chatwoot-cache-bench.XXXXXX")
    chmod 711 "$WORK"   # nginx workers (user nobody) must traverse it
    trap bench_cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    # Settings from the caller's environment must not change what is measured.
    unset RUST_LOG
    # tokio's own variable (sizes the proxy's and bench_origin's runtimes): the targets run
    # with their defaults unless a target sets it itself (chatwoot-cache-1w).
    unset TOKIO_WORKER_THREADS
    local v
    for v in $(compgen -e | grep '^CHATWOOT_CACHE_' || true); do unset "$v"; done
    # Many sockets (2,000 for the coalescing burst, both ends on this machine).
    ulimit -n "$(ulimit -Hn)" 2>/dev/null || ulimit -n 65536 2>/dev/null || true
}

bench_cleanup() {
    local rc=$?
    set +e
    log "stopping everything this script started"
    if [[ -n "$NGINX_PREFIX" && -s "$NGINX_PREFIX/nginx.pid" ]]; then
        nginx -p "$NGINX_PREFIX" -c "$NGINX_PREFIX/nginx.conf" -e "$NGINX_PREFIX/error.log" \
            -s stop >/dev/null 2>&1
    fi
    local pid _
    for pid in "${BENCH_PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null; done
    for pid in "${BENCH_PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 -- "-$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL -- "-$pid" 2>/dev/null
    done
    wait 2>/dev/null
    if [[ -n "$WORK" && -d "$WORK" ]]; then
        if [[ $rc -ne 0 || -n "${BENCH_KEEP_WORK:-}" ]]; then
            log "logs and configs kept in $WORK"
        else
            rm -rf "$WORK"
        fi
        log "stopped"
    fi
    return $rc
}

as_root() { if [[ $(id -u) -eq 0 ]]; then "$@"; else sudo "$@"; fi; }

# Installs the Debian packages providing the given commands (cmd:package pairs) if missing.
ensure_tools() {
    local missing=() pair
    for pair in "$@"; do
        command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    log "installing ${missing[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    if ! as_root timeout "$INSTALL_TIMEOUT" apt-get install -y --no-install-recommends "${missing[@]}" \
        >"$WORK/apt.log" 2>&1; then
        as_root timeout "$INSTALL_TIMEOUT" apt-get update >>"$WORK/apt.log" 2>&1 || true
        as_root timeout "$INSTALL_TIMEOUT" apt-get install -y --no-install-recommends "${missing[@]}" \
            >>"$WORK/apt.log" 2>&1 ||
            die "apt-get install ${missing[*]} failed; see $WORK/apt.log"
    fi
    for pair in "$@"; do
        command -v "${pair%%:*}" >/dev/null 2>&1 || die "${pair%%:*} still missing after installing ${pair#*:}"
    done
}

# Builds the proxy and the helper example in release mode; sets PROXY_BIN and ORIGIN_BIN.
build_binaries() {
    command -v cargo >/dev/null 2>&1 ||
        die "cargo not found: install a Rust toolchain >= 1.88 (https://rustup.rs; Debian's cargo is too old)"
    log "cargo build --release --locked --bin chatwoot-cache --example bench_origin"
    (cd "$ROOT_DIR" && timeout "$BUILD_TIMEOUT" cargo build --release --locked --bin chatwoot-cache \
        --example bench_origin) || die "cargo build failed (or took over BUILD_TIMEOUT=${BUILD_TIMEOUT}s)"
    local target_dir
    target_dir=$(cd "$ROOT_DIR" && cargo metadata --no-deps --format-version 1 2>/dev/null |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])') ||
        target_dir="${CARGO_TARGET_DIR:-$ROOT_DIR/target}"
    PROXY_BIN="$target_dir/release/chatwoot-cache"
    ORIGIN_BIN="$target_dir/release/examples/bench_origin"
    [[ -x "$PROXY_BIN" && -x "$ORIGIN_BIN" ]] || die "binaries not found under $target_dir/release"
}

# Prints N distinct free TCP ports on 127.0.0.1, one per line.
pick_ports() {
    python3 - "$1" <<'PY'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
for s in socks:
    print(s.getsockname()[1])
for s in socks:
    s.close()
PY
}

# start_bg NAME CMD... : runs CMD in a new session (own process group), output to $WORK/NAME.log.
# Sets LAST_PID.
start_bg() {
    local name=$1; shift
    setsid "$@" >"$WORK/$name.log" 2>&1 </dev/null &
    LAST_PID=$!
    BENCH_PIDS+=("$LAST_PID")
}

# wait_http URL [CURL ARGS...] : waits until URL answers anything over HTTP (10 s max).
# answers URL [curl args]: something answers HTTP on URL (status 0), or nothing did after 100
# tries 0.1 s apart, each waiting up to 1 s (1).
answers() {
    local url=$1; shift
    local _ code
    for _ in $(seq 100); do
        code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "$@" "$url" 2>/dev/null || true)
        [[ "$code" != "000" && -n "$code" ]] && return 0
        sleep 0.1
    done
    return 1
}

# wait_http URL [curl args]: as answers, but a URL nothing answers on ends the run.
wait_http() {
    answers "$@" || die "nothing answers on $1 (logs: $WORK)"
}

start_origin() {   # start_origin NAME PORT [extra args]
    local name=$1 port=$2; shift 2
    start_bg "$name" "$ORIGIN_BIN" origin --listen "127.0.0.1:$port" "$@"
    wait_http "http://127.0.0.1:$port/__count"
}

# start_nginx ORIGIN_PORT CACHE_PORT PASS_PORT [CACHE_VALID] : renders the template into
# $WORK/nginx and starts nginx (master + 1 worker) in the foreground of its own process group.
# Sets NGINX_PID.
start_nginx() {
    local origin=$1 cache=$2 pass=$3 valid=${4:-10s} user=""
    NGINX_PREFIX="$WORK/nginx"
    mkdir -p "$NGINX_PREFIX"
    chmod 755 "$NGINX_PREFIX"
    if [[ $(id -u) -eq 0 ]]; then
        if getent group nogroup >/dev/null 2>&1; then user="user nobody nogroup;"; else user="user root;"; fi
    fi
    sed -e "s|@PREFIX@|$NGINX_PREFIX|g" -e "s|@ORIGIN_PORT@|$origin|g" \
        -e "s|@CACHE_PORT@|$cache|g" -e "s|@PASS_PORT@|$pass|g" -e "s|@CACHE_VALID@|$valid|g" -e "s|@USER_DIRECTIVE@|$user|" \
        "$LOAD_DIR/nginx.conf.template" >"$NGINX_PREFIX/nginx.conf"
    nginx -p "$NGINX_PREFIX" -c "$NGINX_PREFIX/nginx.conf" -e "$NGINX_PREFIX/error.log" -t \
        >"$WORK/nginx-t.log" 2>&1 || { cat "$WORK/nginx-t.log" >&2; die "nginx config test failed"; }
    start_bg nginx nginx -p "$NGINX_PREFIX" -c "$NGINX_PREFIX/nginx.conf" -e "$NGINX_PREFIX/error.log"
    # shellcheck disable=SC2034 # used by the scripts
    NGINX_PID=$LAST_PID
    wait_http "http://127.0.0.1:$pass/"
    wait_http "http://127.0.0.1:$cache/"
}

# start_varnish ORIGIN_PORT PORT CACHE_TTL : renders benches/load/varnish.vcl.template into
# $WORK/varnish and starts varnishd (manager + child) in the foreground (-F) of its own process
# group: listens on 127.0.0.1:PORT only, no CLI/admin listener (-T none), working dir (-n, its
# shared-memory log) in $WORK, storage -s malloc,4G (the capacity of the other caches).
# Threads: varnishd is threaded where nginx runs one worker process (one CPU at most). Varnish's
# default 2 thread pools (one per CPU on the 2-CPU benchmark machine, the usual advice) with
# 100..1000 threads each: 64 wrk connections plus the backend fetches never wait for a thread
# and none is created during a run. It can use every CPU of the machine (2 here), like
# chatwoot-cache's tokio runtime. As root, varnishd's default jail (-j unix) runs the manager
# as user varnish and the child as vcache (both created by Debian's package); as another user
# it runs unjailed under that user. Sets VARNISH_PID (the manager).
# Per-request logging is off for every target (nginx access_log off, chatwoot-cache --log-level
# warn); Varnish's equivalent is its shared-memory log (VSL, ~40 records per hit), so the
# per-request and per-fetch records are masked with vsl_mask (errors such as FetchError,
# VCL_Error and Error are still logged). http_gzip_support is off: the VCL keys objects by the
# client's Accept-Encoding class and asks the origin for that class (its gzip bytes are the ones
# chatwoot-cache stores), so Varnish replays each representation as stored, as nginx does;
# with it on, Varnish would fetch gzip for every client and gunzip it on each identity hit.
VARNISH_VSL_MASK=-Begin,-End,-Link,-Timestamp,-ReqStart,-ReqMethod,-ReqURL,-ReqProtocol,-ReqHeader
VARNISH_VSL_MASK+=,-ReqUnset,-ReqAcct,-RespProtocol,-RespStatus,-RespReason,-RespHeader,-RespUnset
VARNISH_VSL_MASK+=,-VCL_call,-VCL_return,-Hit,-Filters,-BereqMethod,-BereqURL,-BereqProtocol
VARNISH_VSL_MASK+=,-BereqHeader,-BereqUnset,-BereqAcct,-BerespProtocol,-BerespStatus,-BerespReason
VARNISH_VSL_MASK+=,-BerespHeader,-BerespUnset,-Storage,-TTL,-Fetch_Body,-Length,-BackendOpen
VARNISH_VSL_MASK+=,-BackendClose,-BackendReuse
start_varnish() {
    local origin=$1 port=$2 ttl=$3 dir="$WORK/varnish"
    mkdir -p "$dir"
    chmod 755 "$dir"
    sed -e "s|@ORIGIN_PORT@|$origin|g" -e "s|@CACHE_TTL@|$ttl|g" \
        "$LOAD_DIR/varnish.vcl.template" >"$dir/bench.vcl"
    chmod 644 "$dir/bench.vcl"
    # like nginx -t: compile the VCL first, so a broken one fails with the compiler's message
    varnishd -C -f "$dir/bench.vcl" -n "$dir/vcc" >/dev/null 2>"$WORK/varnish-C.log" ||
        { cat "$WORK/varnish-C.log" >&2; die "varnish VCL compile failed"; }
    start_bg varnish varnishd -F -n "$dir/workdir" -a "127.0.0.1:$port" -T none \
        -f "$dir/bench.vcl" -s malloc,4G \
        -p thread_pools=2 -p thread_pool_min=100 -p thread_pool_max=1000 \
        -p http_gzip_support=off -p vsl_mask="$VARNISH_VSL_MASK"
    # shellcheck disable=SC2034 # used by the scripts
    VARNISH_PID=$LAST_PID
    wait_http "http://127.0.0.1:$port/"
}

start_proxy() {    # start_proxy NAME ORIGIN_PORT PORT ADMIN_PORT [extra flags]
    local name=$1 origin=$2 port=$3 admin=$4; shift 4
    start_bg "$name" "$PROXY_BIN" --upstream "http://127.0.0.1:$origin" \
        --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin" "$@"
    wait_http "http://127.0.0.1:$admin/healthz"
}

# Direct children of PID (from /proc, no procps needed).
children_of() {
    local parent=$1 f line fields
    for f in /proc/[0-9]*/stat; do
        { read -r line <"$f"; } 2>/dev/null || continue   # (it may have exited meanwhile)
        # fields after "(comm)": state ppid ...
        read -ra fields <<<"${line##*) }"
        [[ "${fields[1]}" == "$parent" ]] && { f=${f#/proc/}; echo "${f%/stat}"; }
    done
    return 0
}

# Sum of utime+stime (clock ticks) of the given pids (all threads included).
cpu_ticks() {
    local total=0 pid line fields
    for pid in "$@"; do
        # (a process that has exited meanwhile, e.g. nginx's cache loader, counts nothing)
        { read -r line <"/proc/$pid/stat"; } 2>/dev/null || continue
        # fields after "(comm)": state(3) ... utime(14) stime(15), numbered as in proc(5)
        read -ra fields <<<"${line##*) }"
        total=$((total + fields[11] + fields[12]))
    done
    echo "$total"
}

# "user system" clock ticks (utime, stime) of the given pids, all threads included.
cpu_ticks_split() {
    local user=0 sys=0 pid line fields
    for pid in "$@"; do
        { read -r line <"/proc/$pid/stat"; } 2>/dev/null || continue
        read -ra fields <<<"${line##*) }"
        user=$((user + fields[11])) sys=$((sys + fields[12]))
    done
    echo "$user $sys"
}

# "busy idle" clock ticks of the whole machine, from /proc/stat.
machine_ticks() {
    local _cpu user nice system idle iowait irq softirq steal _rest
    read -r _cpu user nice system idle iowait irq softirq steal _rest </proc/stat
    echo "$((user + nice + system + irq + softirq + steal)) $((idle + iowait))"
}

# origin_count PORT [FIELD...] : counters of the fake origin (default: total), space-separated,
# all from one /__count request (which itself adds one to "connections").
origin_count() {
    local json port=$1 field out=()
    shift
    [[ $# -gt 0 ]] || set -- total
    json=$(curl -s --max-time 2 "http://127.0.0.1:$port/__count") || die "origin on $port does not answer /__count"
    for field in "$@"; do
        [[ $json =~ \"$field\":([0-9]+) ]] || die "unexpected /__count answer: $json"
        out+=("${BASH_REMATCH[1]}")
    done
    echo "${out[*]}"
}

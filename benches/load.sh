#!/usr/bin/env bash
# Load benchmark of chatwoot-cache against nginx, Varnish and a bare hyper floor (issue 5:
# "beat nginx proxy_cache and Varnish on cache hits").
#
#   bash benches/load.sh
#
# One command, fresh Debian machine: installs wrk, nginx-light, varnish (and curl/python3 if
# missing) with apt-get, builds `chatwoot-cache` and `examples/bench_origin.rs` in release mode,
# then starts on 127.0.0.1 (ports picked at run time, nothing else is contacted):
#   origin          fake Chatwoot (bench_origin origin): ~8 KB conversations, token required
#   floor           bench_origin floor: the same hyper stack returning bytes from memory
#   floor-gzip      bench_origin floor --encoding gzip: the same, returning the gzip bytes
#   nginx-cache     nginx proxy_cache, 1 worker, per-token key (benches/load/nginx.conf.template)
#   nginx-pass      the same nginx, second server block: plain proxy_pass, no cache
#   varnish         varnishd, -s malloc,4G, 2 thread pools, per-token key (url + api_access_token),
#                   the same route cached, everything else passed (benches/load/varnish.vcl.template),
#                   per-request shared-memory log records masked (start_varnish in load/lib.sh)
#   chatwoot-cache  release binary, --log-level warn, --cache-ttl 1h (and chatwoot-cache-1w: the same
#                   with TOKIO_WORKER_THREADS=1, in the stored-miss rounds only, an informational row)
# and runs the same wrk client (-t$THREADS -c$CONNS -d$DURATION --latency, benches/load/wrk.lua)
# against each target for the workloads hit, hit-gzip, miss (pass-through), mixed (90/10) and
# many tokens (1000 tokens x 100 conversations): the caches (nginx-cache, varnish,
# chatwoot-cache) in hit, hit-gzip, mixed and many tokens, with the floor in hit and hit-gzip;
# nginx-pass and chatwoot-cache in miss. Then the stored misses (below). Prints one markdown
# table with req/s, p50, p99 and server CPU per request (utime+stime from /proc over the run),
# plus the issue-5 and issue-15 ratios from the same run, and writes
# benches/results/latest.{md,png,jsonl} (and latest-fill.jsonl, the stored-miss rounds).
#
# hit-gzip is the hit of a client sending `Accept-Encoding: gzip` (browsers, the SDKs): every
# target answers it with the same gzip bytes, checked before anything is measured (status,
# `Content-Encoding: gzip`, the size of the origin's gzip answer, and that it decodes to the
# identity body) and on every answer by wrk.lua (a 200 without `Content-Encoding: gzip` makes
# the row INVALID). chatwoot-cache serves the gzip bytes it stored (SPEC 14: libdeflate level
# 1 of the identity body it fetched). The origin answers gzip when asked, compressed the same
# way (examples/bench_origin.rs), so the peers cache exactly those bytes: nginx and Varnish key
# their entries per token and Accept-Encoding class and ask the origin for that class, so each
# entry holds one representation and is replayed as stored, compressing nothing per request
# (nginx: map $cwc_encoding_class; Varnish: http_gzip_support=off and the class in its hash).
# The floor-gzip process returns the same gzip bytes and headers from memory.
#
# Stored misses (issue 15): ROUNDS rounds; in each, for identity clients and for gzip clients,
# every target (nginx-cache, varnish, chatwoot-cache, in rotated order) takes FILL_TOKENS x
# CONVS requests for keys no cache has seen (an account of their own per round and client
# kind), all stored misses, sent by `bench_origin walk` over CONNS connections; server CPU per
# request from /proc. Reported as each target's median over the rounds with the range, and the
# chatwoot-cache / nginx ratio per round (median and range). What a stored miss costs each side:
#   chatwoot-cache  token check and scope (HMAC), single-flight, the upstream request (its own
#                   keep-alive pool, `Accept-Encoding: identity`), validating the JSON,
#                   compressing it (libdeflate level 1), the strong ETag (SHA-256 of the stored
#                   bytes), building the entry and inserting it into its in-memory store (moka);
#                   the client gets the identity bytes (identity clients; the entry keeps them
#                   as its identity copy) or the gzip bytes (gzip clients); all in its heap.
#   nginx           the upstream request (keepalive 256) with the client's encoding class, then
#                   writes the response as it streams into a new file in its cache directory
#                   (`use_temp_path=off`) and renames it, plus the key's node in its shared
#                   memory zone. Its cache directory is in the run's work directory, on tmpfs
#                   (/dev/shm) when there is one (bench_init), so neither side touches a disk
#                   (with TMPDIR set to a disk, nginx's writes would be page-cache writes).
#                   It never reads, validates or compresses the body: for gzip clients the
#                   origin compressed it (origin CPU, reported apart, not in the ratio).
#   Varnish         like nginx, into its malloc storage.
#
# All caches keep entries fresh for CACHE_TTL (default 1h: chatwoot-cache --cache-ttl, nginx
# proxy_cache_valid 200, Varnish beresp.ttl), so no workload measures expiry: with nginx at 10s,
# its entries expire while the 100k-key many-tokens workload is warmed and measured
# (CACHE_TTL=10s shows that).
#
# Each target is measured ROUNDS times for DURATION, interleaved with the other targets of the
# workload; the table shows the median round (req/s, p50, p99) and CPU per request pooled over
# all rounds, with the req/s range to show the noise; the goal ratios are also given as the
# median of the per-round ratios with their range.
#
# nginx runs 1 worker process, so it uses one CPU at most; varnishd (thread pools) and
# chatwoot-cache (tokio, a worker thread per CPU) are threaded and can use every CPU (2 on the
# benchmark machine). Note that installing Debian's nginx-light / varnish packages also enables
# their system services (nginx on :80, varnish on :6081) on a machine running systemd; this
# script does not use them (`systemctl disable --now nginx varnish` if unwanted).
#
# Environment: DURATION (4s), ROUNDS (5), THREADS (2), CONNS (64), MANY_TOKENS (1000), CONVS (100),
# FILL_TOKENS (200: stored misses per round, target and client kind = FILL_TOKENS x CONVS), CACHE_TTL,
# INSTALL_TIMEOUT (900 s per apt-get/pip call), BUILD_TIMEOUT (3600 s),
# BENCH_SKIP_INSTALL=1, BENCH_SKIP_BUILD=1, BENCH_KEEP_WORK=1 (keep logs/configs),
# BENCH_RESULTS_DIR (default benches/results: where latest.{md,png,jsonl} are written).
# The coalescing check ("2,000 concurrent requests for one cold key") is benches/coalesce.sh.
set -euo pipefail

# shellcheck source=load/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/load/lib.sh"

DURATION=${DURATION:-4s}
ROUNDS=${ROUNDS:-5}
THREADS=${THREADS:-2}
CONNS=${CONNS:-64}
MANY_TOKENS=${MANY_TOKENS:-1000}
CONVS=${CONVS:-100}
FILL_TOKENS=${FILL_TOKENS:-200}
CACHE_TTL=${CACHE_TTL:-1h}
WARM_TIMEOUT=${WARM_TIMEOUT:-600}
RESULTS_DIR=${BENCH_RESULTS_DIR:-$BENCH_DIR/results}

bench_init
LOADAVG_START=$(cut -d' ' -f1-3 /proc/loadavg)
# The tree as it was when the run started ("-dirty": uncommitted changes then; this run's own
# results files are written later and do not count).
GIT_AT_START=$(cd "$ROOT_DIR" && git describe --always --dirty 2>/dev/null || echo unknown)

if [[ -z "${BENCH_SKIP_INSTALL:-}" ]]; then
    ensure_tools wrk:wrk nginx:nginx-light varnishd:varnish curl:curl python3:python3 setsid:util-linux
fi
if [[ -z "${BENCH_SKIP_BUILD:-}" ]]; then
    build_binaries
else
    PROXY_BIN="$ROOT_DIR/target/release/chatwoot-cache"
    ORIGIN_BIN="$ROOT_DIR/target/release/examples/bench_origin"
fi
BUILD_DONE=$(date +%s)

mapfile -t PORTS < <(pick_ports 10)
ORIGIN_PORT=${PORTS[0]} FLOOR_PORT=${PORTS[1]} NGINX_CACHE_PORT=${PORTS[2]}
NGINX_PASS_PORT=${PORTS[3]} PROXY_PORT=${PORTS[4]} PROXY_ADMIN_PORT=${PORTS[5]} VARNISH_PORT=${PORTS[6]}
FLOOR_GZIP_PORT=${PORTS[7]}
PROXY1_PORT=${PORTS[8]} PROXY1_ADMIN_PORT=${PORTS[9]}

log "starting origin :$ORIGIN_PORT, floor :$FLOOR_PORT/:$FLOOR_GZIP_PORT (gzip), nginx :$NGINX_CACHE_PORT/:$NGINX_PASS_PORT, varnish :$VARNISH_PORT, chatwoot-cache :$PROXY_PORT"
start_origin origin "$ORIGIN_PORT"
ORIGIN_PID=$LAST_PID
start_bg floor "$ORIGIN_BIN" floor --listen "127.0.0.1:$FLOOR_PORT"
FLOOR_PID=$LAST_PID
wait_http "http://127.0.0.1:$FLOOR_PORT/"
start_bg floor-gzip "$ORIGIN_BIN" floor --listen "127.0.0.1:$FLOOR_GZIP_PORT" --encoding gzip
FLOOR_GZIP_PID=$LAST_PID
wait_http "http://127.0.0.1:$FLOOR_GZIP_PORT/"
start_nginx "$ORIGIN_PORT" "$NGINX_CACHE_PORT" "$NGINX_PASS_PORT" "$CACHE_TTL"
start_varnish "$ORIGIN_PORT" "$VARNISH_PORT" "$CACHE_TTL"
# The access log is info-level: --log-level warn turns it off, as nginx runs with access_log off.
start_proxy proxy "$ORIGIN_PORT" "$PROXY_PORT" "$PROXY_ADMIN_PORT" \
    --log-level warn --cache-ttl "$CACHE_TTL" --cache-max-bytes 4GiB
PROXY_PID=$LAST_PID
# The same binary with one tokio worker thread (nginx runs one worker process): measured in the
# stored-miss rounds only, as an informational row beside the default.
start_bg proxy-1w env TOKIO_WORKER_THREADS=1 "$PROXY_BIN" --upstream "http://127.0.0.1:$ORIGIN_PORT" \
    --listen "127.0.0.1:$PROXY1_PORT" --admin-listen "127.0.0.1:$PROXY1_ADMIN_PORT" \
    --log-level warn --cache-ttl "$CACHE_TTL" --cache-max-bytes 4GiB
PROXY1_PID=$LAST_PID
# Informational only: if it does not come up (or fails later), the run goes on without it.
PROXY1_DROPPED=""
drop_proxy1() {   # drop_proxy1 WHY: stop it (a hung one would load the judged rounds), keep its log
    # The report says why without this machine's paths; the log line says where.
    PROXY1_DROPPED="$1 (its log, proxy-1w.log, is kept in the bench's work directory)"
    BENCH_KEEP_WORK=1
    kill -TERM -- "-$PROXY1_PID" 2>/dev/null || kill -TERM "$PROXY1_PID" 2>/dev/null || true
    log "WARNING: chatwoot-cache-1w dropped from the stored-miss rounds: $1 (log: $WORK/proxy-1w.log)"
}
answers "http://127.0.0.1:$PROXY1_ADMIN_PORT/healthz" || drop_proxy1 "it did not answer on its admin port at start"

nginx_pids() { echo "$NGINX_PID" "$(children_of "$NGINX_PID" | tr '\n' ' ')"; }
# varnishd: the manager and its child (cache-main, all the worker threads)
varnish_pids() { echo "$VARNISH_PID" "$(children_of "$VARNISH_PID" | tr '\n' ' ')"; }

# ---- sanity: every target answers a conversation with 200 and a ~8 KB body before we measure
TOKEN1=$(printf 'bench%019d' 1)
check_200() {   # check_200 NAME URL
    local out code size
    out=$(curl -s -o /dev/null -w '%{http_code} %{size_download}' --max-time 5 \
        -H "api_access_token: $TOKEN1" "$2") || true
    read -r code size <<<"$out"
    [[ "$code" == 200 && "$size" -gt 4000 ]] || die "$1: GET $2 gave '$out' (want 200, ~8 KB); logs: $WORK"
}
for path in /api/v1/accounts/1/conversations/1 /api/v1/accounts/1/conversations/1/messages; do
    check_200 origin "http://127.0.0.1:$ORIGIN_PORT$path"
    check_200 nginx-cache "http://127.0.0.1:$NGINX_CACHE_PORT$path"
    check_200 nginx-pass "http://127.0.0.1:$NGINX_PASS_PORT$path"
    check_200 varnish "http://127.0.0.1:$VARNISH_PORT$path"
    check_200 chatwoot-cache "http://127.0.0.1:$PROXY_PORT$path"
done
check_200 floor "http://127.0.0.1:$FLOOR_PORT/api/v1/accounts/1/conversations/1"
code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$ORIGIN_PORT/api/v1/accounts/1/conversations/1")
[[ "$code" == 401 ]] || die "origin without token gave $code, want 401"
# The reference caches key per token: a second request with the same token is a HIT, the same
# URL with another token a MISS (account 2 is not used by the workloads).
check_per_token() {   # check_per_token NAME PORT
    local url="http://127.0.0.1:$2/api/v1/accounts/2/conversations/1" got="" t
    for t in 1 1 2 2; do
        got+="$(curl -s -o /dev/null -D - --max-time 5 -H "api_access_token: $(printf 'check%019d' "$t")" "$url" |
            tr -d '\r' | sed -n 's/^[Xx]-[Cc]ache: *//p') "
    done
    [[ "$got" == "MISS HIT MISS HIT " ]] ||
        die "$1: X-Cache for token 1, 1, 2, 2 on one URL was '$got' (want MISS HIT MISS HIT); logs: $WORK"
}
check_per_token nginx-cache "$NGINX_CACHE_PORT"
check_per_token varnish "$VARNISH_PORT"

# gzip clients: every target answers the same gzip bytes (Content-Encoding, size, and that they
# decode to the identity body), the caches from their store (the second request is a HIT), and
# identity clients still get identity bytes after the gzip entries exist. Account 3 is used by
# no workload.
GZ_CHECK="$WORK/gzip-check"
mkdir -p "$GZ_CHECK"
fetch() {   # fetch NAME URL [ACCEPT_ENCODING] : body to $GZ_CHECK/NAME.body, head to NAME.head
    local ae=()
    [[ -n "${3:-}" ]] && ae=(-H "Accept-Encoding: $3")
    curl -s --max-time 5 -o "$GZ_CHECK/$1.body" -D "$GZ_CHECK/$1.head" -H "api_access_token: $TOKEN1" \
        "${ae[@]}" "$2" || die "$1: GET $2 failed"
    tr -d '\r' <"$GZ_CHECK/$1.head" >"$GZ_CHECK/$1.h" && mv "$GZ_CHECK/$1.h" "$GZ_CHECK/$1.head"
}
head_field() { sed -n "s/^$2: *//Ip" "$GZ_CHECK/$1.head" | tail -1; }
GZ_PATH=/api/v1/accounts/3/conversations/1
fetch origin-identity "http://127.0.0.1:$ORIGIN_PORT$GZ_PATH"
fetch origin-gzip "http://127.0.0.1:$ORIGIN_PORT$GZ_PATH" gzip
GZ_SIZE=$(stat -c %s "$GZ_CHECK/origin-gzip.body")
IDENTITY_SIZE=$(stat -c %s "$GZ_CHECK/origin-identity.body")
[[ "$(head_field origin-gzip content-encoding)" == gzip && $GZ_SIZE -lt $IDENTITY_SIZE ]] ||
    die "origin: no smaller gzip answer for a gzip client ($GZ_SIZE vs $IDENTITY_SIZE bytes; $GZ_CHECK)"
# check_gzip NAME GOT_FILE [WANT_X_CACHE]
check_gzip() {
    local code size enc xc
    code=$(sed -n '1s/^HTTP\/[0-9.]* \([0-9]*\).*/\1/p' "$GZ_CHECK/$2.head")
    size=$(stat -c %s "$GZ_CHECK/$2.body")
    enc=$(head_field "$2" content-encoding)
    xc=$(head_field "$2" x-cache)
    [[ "$code" == 200 && "$enc" == gzip && "$size" == "$GZ_SIZE" ]] ||
        die "$1 to a gzip client: status '$code', Content-Encoding '$enc', $size bytes (want 200, gzip, the origin's $GZ_SIZE bytes; $GZ_CHECK)"
    [[ -z "${3:-}" || "$xc" == "$3" ]] || die "$1 to a gzip client: X-Cache '$xc', want $3 ($GZ_CHECK)"
    python3 -c 'import gzip, sys; sys.exit(gzip.decompress(open(sys.argv[1], "rb").read()) != open(sys.argv[2], "rb").read())' \
        "$GZ_CHECK/$2.body" "$GZ_CHECK/origin-identity.body" ||
        die "$1: the gzip answer does not decode to the origin's identity body ($GZ_CHECK)"
    cmp -s "$GZ_CHECK/$2.body" "$GZ_CHECK/origin-gzip.body" ||
        log "note: $1's gzip bytes differ from the origin's (same size, same identity body)"
}
for spec in nginx-cache=$NGINX_CACHE_PORT varnish=$VARNISH_PORT chatwoot-cache=$PROXY_PORT; do
    name=${spec%%=*} port=${spec#*=}
    fetch "$name-gzip-1" "http://127.0.0.1:$port$GZ_PATH" gzip
    fetch "$name-gzip-2" "http://127.0.0.1:$port$GZ_PATH" gzip
    check_gzip "$name" "$name-gzip-1" MISS
    check_gzip "$name" "$name-gzip-2" HIT
    fetch "$name-identity" "http://127.0.0.1:$port$GZ_PATH"
    if [[ -n "$(head_field "$name-identity" content-encoding)" ]] ||
        ! cmp -s "$GZ_CHECK/$name-identity.body" "$GZ_CHECK/origin-identity.body"; then
        die "$name: an identity client after a gzip one did not get the identity body ($GZ_CHECK)"
    fi
done
fetch floor-gzip "http://127.0.0.1:$FLOOR_GZIP_PORT/api/v1/accounts/1/conversations/1" gzip
fetch origin-gzip-1 "http://127.0.0.1:$ORIGIN_PORT/api/v1/accounts/1/conversations/1" gzip
[[ "$(stat -c %s "$GZ_CHECK/floor-gzip.body")" == "$(stat -c %s "$GZ_CHECK/origin-gzip-1.body")" &&
    "$(head_field floor-gzip content-encoding)" == gzip ]] ||
    die "floor-gzip: not the origin's gzip answer for conversation 1 ($GZ_CHECK)"
log "gzip clients: every target answers the same $GZ_SIZE gzip bytes (identity: $IDENTITY_SIZE)"

# ---- measurement
CLK_TCK=$(getconf CLK_TCK)
NCPU=$(nproc)
RAW="$WORK/results.jsonl"
: >"$RAW"
WARM_RAW="$WORK/warm.jsonl"
: >"$WARM_RAW"
FILL_RAW="$WORK/fill.jsonl"
: >"$FILL_RAW"

# measure WORKLOAD TARGET URL MODE TOKENS PIDS_FUNCTION
measure() {
    local workload=$1 target=$2 url=$3 mode=$4 tokens=$5 pids_fn=$6
    local pids out origin_before origin_after srv0 srv1 org0 org1 m0 m1 t0 t1 wrk_cpu conn0 conn1
    pids=$($pids_fn)
    local counts
    counts=$(origin_count "$ORIGIN_PORT" total connections) || exit 1
    read -r origin_before conn0 <<<"$counts"
    # shellcheck disable=SC2086 # a list of pids
    srv0=$(cpu_ticks $pids)
    org0=$(cpu_ticks "$ORIGIN_PID")
    m0=$(machine_ticks)
    t0=$(date +%s%N)
    out="$WORK/wrk-$workload-$target-${ROUND:-1}.txt"
    # wrk's own CPU (user+sys seconds) via the bash `time` keyword
    local TIMEFORMAT='%U %S'
    {
        time BENCH_MODE=$mode BENCH_TOKENS=$tokens BENCH_CONVS=$CONVS BENCH_ACCEPT_ENCODING=${ACCEPT_ENCODING:-} \
            timeout 120 wrk -t"$THREADS" -c"$CONNS" -d"$DURATION" --latency --timeout 5s \
            -s "$LOAD_DIR/wrk.lua" "$url" >"$out" 2>&1
    } 2>"$WORK/time-$workload-$target-${ROUND:-1}.txt" || die "wrk failed for $workload/$target: $(tail -5 "$out")"
    t1=$(date +%s%N)
    m1=$(machine_ticks)
    # shellcheck disable=SC2086
    srv1=$(cpu_ticks $pids)
    org1=$(cpu_ticks "$ORIGIN_PID")
    counts=$(origin_count "$ORIGIN_PORT" total connections) || exit 1
    read -r origin_after conn1 <<<"$counts"
    wrk_cpu=$(tail -1 "$WORK/time-$workload-$target-${ROUND:-1}.txt")
    local json
    json=$(grep '^BENCH_JSON ' "$out" | sed 's/^BENCH_JSON //') || die "no BENCH_JSON in $out"
    local uses_origin=true
    [[ $target == floor ]] && uses_origin=false
    printf '{"workload":"%s","target":"%s","round":%d,"wrk":%s,"server_ticks":%d,"origin_ticks":%d,"origin_requests":%d,"origin_connections":%d,"uses_origin":%s,"wall_ns":%d,"machine_busy_ticks":%d,"machine_idle_ticks":%d,"wrk_cpu_s":%s,"clk_tck":%d,"ncpu":%d,"server_pids":"%s"}\n' \
        "$workload" "$target" "${ROUND:-1}" "$json" $((srv1 - srv0)) $((org1 - org0)) \
        $((origin_after - origin_before)) $((conn1 - conn0 - 1)) "$uses_origin" $((t1 - t0)) \
        $(( ${m1% *} - ${m0% *} )) $(( ${m1#* } - ${m0#* } )) \
        "$(awk '{printf "%.3f", $1 + $2}' <<<"$wrk_cpu")" "$CLK_TCK" "$NCPU" "$pids" >>"$RAW"
    python3 "$LOAD_DIR/report.py" line "$RAW" >&2
}

floor_pids() { echo "$FLOOR_PID"; }
floor_gzip_pids() { echo "$FLOOR_GZIP_PID"; }
origin_pids() { echo "$ORIGIN_PID"; }
proxy_pids() { echo "$PROXY_PID"; }
proxy1_pids() { echo "$PROXY1_PID"; }

# warm NAME PORT TOKENS PIDS_FUNCTION [WALK FLAGS...] : requests every (token, conversation)
# once (cold: stored misses), recording time and CPU, so the cold fill is reported too.
warm() {
    local name=$1 port=$2 tokens=$3 pids_fn=$4 out pids srv0 srv1 org0 org1 t0 t1
    shift 4
    pids=$($pids_fn)
    # shellcheck disable=SC2086
    srv0=$(cpu_ticks $pids)
    org0=$(cpu_ticks "$ORIGIN_PID")
    t0=$(date +%s%N)
    # Bounded: a target that stops answering must not hang the run.
    out=$(timeout "$WARM_TIMEOUT" "$ORIGIN_BIN" walk --base "http://127.0.0.1:$port" --tokens "$tokens" \
        --convs "$CONVS" --concurrency "$CONNS" "$@") || die "warming $name failed or took over ${WARM_TIMEOUT}s: $out"
    t1=$(date +%s%N)
    # shellcheck disable=SC2086
    srv1=$(cpu_ticks $pids)
    org1=$(cpu_ticks "$ORIGIN_PID")
    printf '{"target":"%s","tokens":%d,"walk":%s,"wall_ns":%d,"server_ticks":%d,"origin_ticks":%d,"clk_tck":%d}\n' \
        "$name" "$tokens" "$out" $((t1 - t0)) $((srv1 - srv0)) $((org1 - org0)) "$CLK_TCK" >>"$WARM_RAW"
    log "warmed $name ($tokens token(s) x $CONVS conversations${*:+, $*}): $out"
}

# fill ROUND KIND ACCOUNT NAME PORT PIDS_FUNCTION : FILL_TOKENS x CONVS stored misses (keys of
# ACCOUNT, which nothing requested before) by KIND (identity | gzip) clients, recording server,
# origin and machine CPU, for the stored-miss rounds.
fill() {
    local round=$1 kind=$2 account=$3 name=$4 port=$5 pids_fn=$6
    local out pids srv0 srv1 org0 org1 m0 m1 t0 t1 flags=()
    [[ $kind == gzip ]] && flags=(--accept-encoding gzip)
    pids=$($pids_fn)
    # shellcheck disable=SC2086
    srv0=$(cpu_ticks_split $pids)
    org0=$(cpu_ticks "$ORIGIN_PID")
    m0=$(machine_ticks)
    t0=$(date +%s%N)
    if ! out=$(timeout "$WARM_TIMEOUT" "$ORIGIN_BIN" walk --base "http://127.0.0.1:$port" --account "$account" \
        --tokens "$FILL_TOKENS" --convs "$CONVS" --concurrency "$CONNS" "${flags[@]}"); then
        # The one-worker row is informational: its failure drops it, not the run.
        if [[ $name == chatwoot-cache-1w ]]; then
            drop_proxy1 "round $round, $kind clients: the walk failed or took over ${WARM_TIMEOUT}s: ${out:-no output}"
            return 0
        fi
        die "stored misses on $name ($kind clients) failed or took over ${WARM_TIMEOUT}s: $out"
    fi
    t1=$(date +%s%N)
    m1=$(machine_ticks)
    # shellcheck disable=SC2086
    srv1=$(cpu_ticks_split $pids)
    org1=$(cpu_ticks "$ORIGIN_PID")
    local user=$(( ${srv1% *} - ${srv0% *} )) sys=$(( ${srv1#* } - ${srv0#* } ))
    printf '{"round":%d,"kind":"%s","account":%d,"target":"%s","walk":%s,"wall_ns":%d,"server_ticks":%d,"server_user_ticks":%d,"server_sys_ticks":%d,"origin_ticks":%d,"machine_busy_ticks":%d,"machine_idle_ticks":%d,"clk_tck":%d,"ncpu":%d}\n' \
        "$round" "$kind" "$account" "$name" "$out" $((t1 - t0)) $((user + sys)) "$user" "$sys" $((org1 - org0)) \
        $(( ${m1% *} - ${m0% *} )) $(( ${m1#* } - ${m0#* } )) "$CLK_TCK" "$NCPU" >>"$FILL_RAW"
    python3 "$LOAD_DIR/report.py" fill-line "$FILL_RAW" >&2
}

# run_workload WORKLOAD MODE TOKENS TARGET... : ROUNDS rounds over the targets, the order
# rotated each round, so a disturbance (another process on the machine) hits every target alike.
# TARGET is name=port=pids_function.
run_workload() {
    local workload=$1 mode=$2 tokens=$3; shift 3
    local targets=("$@") n=$# r i spec name port fn
    for ((r = 0; r < ROUNDS; r++)); do
        for ((i = 0; i < n; i++)); do
            spec=${targets[$(((i + r) % n))]}
            IFS='=' read -r name port fn <<<"$spec"
            ROUND=$((r + 1)) measure "$workload" "$name" "http://127.0.0.1:$port" "$mode" "$tokens" "$fn"
        done
    done
}

log "workload hit: warm, then floor / nginx-cache / varnish / chatwoot-cache ($ROUNDS rounds of $DURATION)"
warm nginx-cache "$NGINX_CACHE_PORT" 1 nginx_pids
warm varnish "$VARNISH_PORT" 1 varnish_pids
warm chatwoot-cache "$PROXY_PORT" 1 proxy_pids
run_workload hit hit 1 "floor=$FLOOR_PORT=floor_pids" "nginx-cache=$NGINX_CACHE_PORT=nginx_pids" \
    "varnish=$VARNISH_PORT=varnish_pids" "chatwoot-cache=$PROXY_PORT=proxy_pids"

log "workload hit-gzip (Accept-Encoding: gzip): warm, then floor-gzip / nginx-cache / varnish / chatwoot-cache"
warm nginx-cache "$NGINX_CACHE_PORT" 1 nginx_pids --accept-encoding gzip
warm varnish "$VARNISH_PORT" 1 varnish_pids --accept-encoding gzip
warm chatwoot-cache "$PROXY_PORT" 1 proxy_pids --accept-encoding gzip
ACCEPT_ENCODING=gzip run_workload hit-gzip hit 1 "floor=$FLOOR_GZIP_PORT=floor_gzip_pids" \
    "nginx-cache=$NGINX_CACHE_PORT=nginx_pids" "varnish=$VARNISH_PORT=varnish_pids" \
    "chatwoot-cache=$PROXY_PORT=proxy_pids"

log "workload miss (pass-through GET .../conversations/{c}/messages): origin direct / nginx-pass / chatwoot-cache"
run_workload miss miss 1 "origin-direct=$ORIGIN_PORT=origin_pids" "nginx-pass=$NGINX_PASS_PORT=nginx_pids" \
    "chatwoot-cache=$PROXY_PORT=proxy_pids"

log "workload mixed (90% cached conversation paths, 10% pass-through)"
run_workload mixed mixed 1 "nginx-cache=$NGINX_CACHE_PORT=nginx_pids" "varnish=$VARNISH_PORT=varnish_pids" \
    "chatwoot-cache=$PROXY_PORT=proxy_pids"

log "workload many tokens ($MANY_TOKENS tokens x $CONVS conversations): warm, then measure"
warm nginx-cache "$NGINX_CACHE_PORT" "$MANY_TOKENS" nginx_pids
warm varnish "$VARNISH_PORT" "$MANY_TOKENS" varnish_pids
warm chatwoot-cache "$PROXY_PORT" "$MANY_TOKENS" proxy_pids
run_workload many many "$MANY_TOKENS" "nginx-cache=$NGINX_CACHE_PORT=nginx_pids" \
    "varnish=$VARNISH_PORT=varnish_pids" "chatwoot-cache=$PROXY_PORT=proxy_pids"

log "stored misses: $ROUNDS rounds x (identity, gzip clients) x $FILL_TOKENS tokens x $CONVS conversations of fresh accounts"
FILL_TARGETS=("nginx-cache=$NGINX_CACHE_PORT=nginx_pids" "varnish=$VARNISH_PORT=varnish_pids"
    "chatwoot-cache=$PROXY_PORT=proxy_pids" "chatwoot-cache-1w=$PROXY1_PORT=proxy1_pids")
for ((r = 0; r < ROUNDS; r++)); do
    k=0
    for kind in identity gzip; do
        # accounts 100, 101, ...: one per round and client kind, requested by nothing else
        account=$((100 + 2 * r + k))
        k=$((k + 1))
        for ((i = 0; i < ${#FILL_TARGETS[@]}; i++)); do
            IFS='=' read -r name port fn <<<"${FILL_TARGETS[$(((i + r) % ${#FILL_TARGETS[@]}))]}"
            [[ $name == chatwoot-cache-1w && -n $PROXY1_DROPPED ]] && continue
            fill $((r + 1)) "$kind" "$account" "$name" "$port" "$fn"
        done
    done
done

# ---- liveness after the load: the proxy must still be up and serving
kill -0 "$PROXY_PID" 2>/dev/null || die "chatwoot-cache exited during the run (log: $WORK/proxy.log)"
check_200 chatwoot-cache-after "http://127.0.0.1:$PROXY_PORT/api/v1/accounts/1/conversations/1"
curl -s --max-time 2 "http://127.0.0.1:$PROXY_ADMIN_PORT/metrics" >"$WORK/proxy-metrics.txt" || true
PROXY_LOG_LINES=$(grep -c . "$WORK/proxy.log" || true)
PROXY_LOG_SAMPLE=$(head -c 300 "$WORK/proxy.log" | head -3 | tr '\n' ' ' || true)
NGINX_ERRORS=$(grep -c -E '\[(error|crit|alert|emerg)\]' "$NGINX_PREFIX/error.log" || true)
# A varnish child that panicked or died was restarted by the manager with an empty cache.
kill -0 "$VARNISH_PID" 2>/dev/null || log "WARNING: varnishd exited during the run (log: $WORK/varnish.log)"
VARNISH_RESTARTS=$(grep -c -i -E 'panic|died|not responding' "$WORK/varnish.log" || true)

# ---- report (table from this run only)
mkdir -p "$RESULTS_DIR"
cp "$RAW" "$RESULTS_DIR/latest.jsonl"
cp "$FILL_RAW" "$RESULTS_DIR/latest-fill.jsonl"
M_NPROC=$NCPU \
M_CPU_MODEL=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//' || echo unknown) \
M_KERNEL=$(uname -srm) \
M_DATE=$(date -u +%Y-%m-%dT%H:%M:%SZ) \
M_GIT=$GIT_AT_START \
M_WRK="wrk -t$THREADS -c$CONNS -d$DURATION --latency --timeout 5s -s benches/load/wrk.lua" \
M_ROUNDS=$ROUNDS \
M_NGINX=$(nginx -v 2>&1 | sed 's/.*: //') \
M_VARNISH=$(varnishd -V 2>&1 | head -1 | sed 's/^varnishd (\([^ ]*\).*/\1/') \
M_LOADAVG_START=$LOADAVG_START \
M_LOADAVG_END=$(cut -d' ' -f1-3 /proc/loadavg) \
M_PROXY_LOG_LINES=${PROXY_LOG_LINES:-0} \
M_PROXY_LOG_SAMPLE=${PROXY_LOG_SAMPLE:-} \
M_NGINX_ERROR_LINES=${NGINX_ERRORS:-0} \
M_VARNISH_RESTART_LINES=${VARNISH_RESTARTS:-0} \
M_CACHE_TTL=$CACHE_TTL \
M_MANY_TOKENS=$MANY_TOKENS \
M_CONVS=$CONVS \
M_PROXY1_DROPPED=$PROXY1_DROPPED \
M_FILL_TOKENS=$FILL_TOKENS \
    python3 -c 'import json, os; print(json.dumps({k[2:].lower(): v for k, v in os.environ.items() if k.startswith("M_")}))' \
    >"$WORK/machine.json"
TABLE_RC=0
python3 "$LOAD_DIR/report.py" table "$RAW" "$WORK/machine.json" "$RESULTS_DIR/latest.md" "$WARM_RAW" "$FILL_RAW" ||
    TABLE_RC=$?
[[ -s "$RESULTS_DIR/latest.md" ]] || die "report.py failed (rc $TABLE_RC)"
echo
cat "$RESULTS_DIR/latest.md"
echo

PLOT_PY=""
if python3 -c 'import matplotlib' >/dev/null 2>&1; then
    PLOT_PY=python3
elif [[ -z "${BENCH_SKIP_INSTALL:-}" ]] && [[ -x /usr/bin/python3 ]] &&
    { /usr/bin/python3 -c 'import matplotlib' >/dev/null 2>&1 ||
        { DEBIAN_FRONTEND=noninteractive as_root timeout "$INSTALL_TIMEOUT" apt-get install -y \
            --no-install-recommends python3-matplotlib >"$WORK/apt-plot.log" 2>&1 &&
            /usr/bin/python3 -c 'import matplotlib' >/dev/null 2>&1; }; }; then
    # Debian's matplotlib, for Debian's python3 (another python3 may come first on PATH).
    PLOT_PY=/usr/bin/python3
else
    VENV="${XDG_CACHE_HOME:-$HOME/.cache}/chatwoot-cache-bench/venv"
    if [[ ! -x "$VENV/bin/python" ]] || ! "$VENV/bin/python" -c 'import matplotlib' >/dev/null 2>&1; then
        log "installing matplotlib into $VENV (for the plot)"
        if ! python3 -m venv "$VENV" >"$WORK/pip.log" 2>&1; then
            # Debian ships venv/ensurepip separately
            rm -rf "$VENV"
            as_root timeout "$INSTALL_TIMEOUT" apt-get install -y --no-install-recommends python3-venv \
                >>"$WORK/pip.log" 2>&1 || true
            python3 -m venv "$VENV" >>"$WORK/pip.log" 2>&1 || true
        fi
        if [[ -x "$VENV/bin/pip" ]]; then
            timeout "$INSTALL_TIMEOUT" "$VENV/bin/pip" install -q matplotlib >>"$WORK/pip.log" 2>&1 || true
        fi
    fi
    "$VENV/bin/python" -c 'import matplotlib' >/dev/null 2>&1 && PLOT_PY="$VENV/bin/python"
fi
if [[ -n "$PLOT_PY" ]] && "$PLOT_PY" "$LOAD_DIR/report.py" plot "$RAW" "$RESULTS_DIR/latest.png" >"$WORK/plot.log" 2>&1; then
    log "plot: $RESULTS_DIR/latest.png"
else
    log "plot NOT written (matplotlib unavailable or plotting failed: see $WORK/plot.log / pip.log); the table is complete"
    BENCH_KEEP_WORK=1
fi
log "table: $RESULTS_DIR/latest.md; raw: $RESULTS_DIR/latest.jsonl"
log "measured part took $(( $(date +%s) - BUILD_DONE )) s (after the build)"
if [[ $TABLE_RC -ne 0 ]]; then
    BENCH_KEEP_WORK=1
    die "some runs had non-200 answers, wrong codings or socket errors (see the table); numbers are not valid"
fi

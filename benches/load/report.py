#!/usr/bin/env python3
"""Turns the raw rows written by benches/load.sh (one JSON object per wrk run) into the table
and the plot. Only numbers from the given file are used: never compare across runs.

    report.py line  RAW                 one-line summary of the last row (progress)
    report.py fill-line FILL            one-line summary of the last stored-miss round (progress)
    report.py table RAW MACHINE OUT.md [WARM [FILL]]
                                        markdown table + issue-5 and issue-15 ratios (+ the cold
                                        fill from WARM, the stored-miss rounds from FILL); exit 3
                                        if a run had non-200 answers, answers in the wrong coding
                                        or socket errors
    report.py plot  RAW OUT.png         throughput / p99 / CPU per request (needs matplotlib)
"""

import json
import sys

WORKLOAD_ORDER = ["hit", "hit-gzip", "miss", "mixed", "many"]
WORKLOAD_LABEL = {
    "hit": "hit",
    "hit-gzip": "hit, gzip clients",
    "miss": "miss (pass-through)",
    "mixed": "mixed 90/10",
    "many": "many tokens",
}
TARGET_ORDER = ["floor", "origin-direct", "nginx-cache", "nginx-pass", "varnish", "chatwoot-cache"]
TARGET_LABEL = {
    "floor": "bare hyper floor",
    "origin-direct": "origin direct",
    "nginx-cache": "nginx proxy_cache",
    "nginx-pass": "nginx proxy_pass",
    "varnish": "Varnish",
    "chatwoot-cache": "chatwoot-cache",
    "chatwoot-cache-1w": "chatwoot-cache, 1 worker thread",
}


def load(path):
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                rows.append(derive(json.loads(line)))
    return rows


def derive(r):
    w = r["wrk"]
    tck = r["clk_tck"]
    reqs = max(w["requests"], 1)
    dur_s = w["duration_us"] / 1e6
    wall_s = r["wall_ns"] / 1e9
    d = dict(r)
    d["requests"] = w["requests"]
    d["rps"] = w["requests"] / dur_s if dur_s > 0 else 0.0
    d["p50_ms"] = w["p50_us"] / 1000.0
    d["p99_ms"] = w["p99_us"] / 1000.0
    d["cpu_us"] = r["server_ticks"] / tck * 1e6 / reqs
    own_origin = r["target"] == "origin-direct"
    d["origin_cpu_us"] = (
        r["origin_ticks"] / tck * 1e6 / reqs if r["uses_origin"] and not own_origin else None
    )
    e = w["errors"]
    d["socket_errors"] = e["connect"] + e["read"] + e["write"] + e["timeout"]
    d["bad"] = w["non200"] + w["empty200"] + w.get("wrong_encoding", 0) + d["socket_errors"]
    measured = r["server_ticks"] + (0 if own_origin else r["origin_ticks"]) + r["wrk_cpu_s"] * tck
    capacity = wall_s * tck * r["ncpu"]
    d["wrk_cpu_pct"] = 100.0 * r["wrk_cpu_s"] / wall_s / r["ncpu"] if wall_s else 0.0
    d["other_cpu_pct"] = max(0.0, 100.0 * (r["machine_busy_ticks"] - measured) / capacity) if capacity else 0.0
    return d


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def aggregate(rows):
    """One row per (workload, target): medians of the rounds for req/s, p50, p99; CPU per
    request and the CPU shares pooled over all rounds; counts summed."""
    groups = {}
    for r in rows:
        groups.setdefault((r["workload"], r["target"]), []).append(r)
    out = []
    for (workload, target), rs in groups.items():
        tck = rs[0]["clk_tck"]
        ncpu = rs[0]["ncpu"]
        reqs = max(sum(r["requests"] for r in rs), 1)
        own_origin = target == "origin-direct"
        server_ticks = sum(r["server_ticks"] for r in rs)
        origin_ticks = sum(r["origin_ticks"] for r in rs)
        wrk_s = sum(r["wrk_cpu_s"] for r in rs)
        wall_s = sum(r["wall_ns"] for r in rs) / 1e9
        busy = sum(r["machine_busy_ticks"] for r in rs)
        measured = server_ticks + (0 if own_origin else origin_ticks) + wrk_s * tck
        capacity = wall_s * tck * ncpu
        a = {
            "workload": workload,
            "target": target,
            "rounds": len(rs),
            "requests": reqs,
            "rps": median([r["rps"] for r in rs]),
            "rps_min": min(r["rps"] for r in rs),
            "rps_max": max(r["rps"] for r in rs),
            "p50_ms": median([r["p50_ms"] for r in rs]),
            "p99_ms": median([r["p99_ms"] for r in rs]),
            "cpu_us": server_ticks / tck * 1e6 / reqs,
            "origin_cpu_us": origin_ticks / tck * 1e6 / reqs
            if rs[0]["uses_origin"] and not own_origin
            else None,
            "uses_origin": rs[0]["uses_origin"],
            "origin_requests": sum(r["origin_requests"] for r in rs),
            "origin_connections": sum(r.get("origin_connections", 0) for r in rs),
            # answers in the wrong coding (wrk.lua) count as non-200: the run is invalid
            "non200": sum(
                r["wrk"]["non200"] + r["wrk"]["empty200"] + r["wrk"].get("wrong_encoding", 0) for r in rs
            ),
            "min_body": min((r["wrk"].get("min_body", 0) for r in rs), default=0),
            "max_body": max((r["wrk"].get("max_body", 0) for r in rs), default=0),
            "socket_errors": sum(r["socket_errors"] for r in rs),
            "wrk_cpu_pct": 100.0 * wrk_s / wall_s / ncpu if wall_s else 0.0,
            "other_cpu_pct": max(0.0, 100.0 * (busy - measured) / capacity) if capacity else 0.0,
        }
        a["bad"] = a["non200"] + a["socket_errors"]
        xc = {}
        for r in rs:
            for k, v in r["wrk"].get("x_cache_sampled", {}).items():
                xc[k] = xc.get(k, 0) + v
        a["x_cache_sampled"] = xc
        out.append(a)
    return out


def find(rows, workload, target):
    for r in rows:
        if r["workload"] == workload and r["target"] == target:
            return r
    return None


def fmt_int(x):
    return f"{x:,.0f}"


def line(raw):
    r = load(raw)[-1]
    origin = f", origin {r['origin_cpu_us']:.1f} µs/req" if r["origin_cpu_us"] is not None else ""
    print(
        f"  {r['workload']:>5} {r['target']:<15} #{r.get('round', 1)} {fmt_int(r['rps']):>9} req/s  p50 {r['p50_ms']:.2f} ms"
        f"  p99 {r['p99_ms']:.2f} ms  {r['cpu_us']:.1f} µs CPU/req{origin}"
        f"  origin reqs {r['origin_requests']} (conns {r.get('origin_connections', '?')})  non-200 {r['wrk']['non200']}"
        f"  socket errors {r['socket_errors']}  other CPU {r['other_cpu_pct']:.0f}%"
    )


def ratio(a, b):
    return a / b if a is not None and b not in (None, 0) else None


def round_ratios(raw_rows, workload, a, b, key):
    """key(a) / key(b) in each round both were measured in (the targets of one round run back
    to back): the per-round ratios, in round order."""
    by = {}
    for r in raw_rows:
        if r["workload"] == workload:
            by[(r["target"], r.get("round", 1))] = r
    out = []
    for (target, rnd), ra in sorted(by.items(), key=lambda kv: kv[0][1]):
        rb = by.get((b, rnd))
        if target == a and rb is not None:
            v = ratio(ra[key], rb[key])
            if v is not None:
                out.append(v)
    return out


def spread(xs):
    """'median (min–max, n rounds)' of per-round values."""
    if not xs:
        return "n/a"
    return f"{median(xs):.2f}x ({min(xs):.2f}–{max(xs):.2f}, {len(xs)} rounds)"


def load_fill(path):
    rows = []
    with open(path) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                n = max(r["walk"]["requests"], 1)
                tck = r["clk_tck"]
                wall_s = r["wall_ns"] / 1e9
                r["cpu_us"] = r["server_ticks"] / tck * 1e6 / n
                r["user_us"] = r.get("server_user_ticks", 0) / tck * 1e6 / n
                r["sys_us"] = r.get("server_sys_ticks", 0) / tck * 1e6 / n
                r["origin_cpu_us"] = r["origin_ticks"] / tck * 1e6 / n
                r["rps"] = n / wall_s if wall_s else 0.0
                measured = r["server_ticks"] + r["origin_ticks"]
                capacity = wall_s * tck * r["ncpu"]
                # the walk client's CPU is not measured apart: "other" includes it here
                r["other_cpu_pct"] = (
                    max(0.0, 100.0 * (r["machine_busy_ticks"] - measured) / capacity) if capacity else 0.0
                )
                r["ok"] = r["walk"]["ok_200"] == r["walk"]["requests"] and not r["walk"]["errors"]
                r["misses"] = r["walk"]["x_cache"].get("MISS", 0)
                rows.append(r)
    return rows


def fill_line(path):
    r = load_fill(path)[-1]
    print(
        f"  fill #{r['round']} {r['kind']:<8} {r['target']:<15} {fmt_int(r['walk']['requests'])} req "
        f"{fmt_int(r['rps']):>7} req/s  {r['cpu_us']:.1f} µs CPU/req (user {r['user_us']:.1f}, system "
        f"{r['sys_us']:.1f}; origin {r['origin_cpu_us']:.1f})"
        f"  X-Cache {r['walk']['x_cache']}  all 200: {'yes' if r['ok'] else 'NO'}  other CPU {r['other_cpu_pct']:.0f}%"
    )


def fill_section(path, m):
    """The stored-miss rounds: per client kind and target, median and range over the rounds;
    chatwoot-cache / nginx per round. Returns (lines, ratio summaries, invalid)."""
    rows = load_fill(path)
    if not rows:
        return [], {}, False
    L = []
    L.append(
        f"Stored misses (issue 15): {m.get('rounds', '?')} rounds; in each, for each client kind and target "
        f"(rotated order), {m.get('fill_tokens', '?')} tokens x {m.get('convs', '?')} conversations of an account "
        "nothing requested before, all stored misses (`bench_origin walk`, same concurrency as wrk). "
        "Median over the rounds, range in brackets:"
    )
    L.append("")
    L.append(
        "| clients | target | requests per round | req/s | µs CPU/req (server) | of which user / system "
        "| µs CPU/req (origin) | all 200, all MISS | other CPU (incl. the client) |"
    )
    L.append("|---|---|---:|---:|---:|---:|---:|---|---:|")
    invalid = False
    summary = {}
    for kind in ("identity", "gzip"):
        for target in ("nginx-cache", "varnish", "chatwoot-cache", "chatwoot-cache-1w"):
            rs = [r for r in rows if r["kind"] == kind and r["target"] == target]
            if not rs:
                continue
            ok = all(r["ok"] and r["misses"] == r["walk"]["requests"] for r in rs)
            # The one-worker row is informational: a bad round marks its own row, not the run.
            informational = target == "chatwoot-cache-1w"
            invalid = invalid or (not ok and not informational)
            dropped = informational and m.get("proxy1_dropped")
            cpu = [r["cpu_us"] for r in rs]
            org = [r["origin_cpu_us"] for r in rs]
            rps = [r["rps"] for r in rs]
            L.append(
                f"| {kind} | {TARGET_LABEL.get(target, target)} | {fmt_int(rs[0]['walk']['requests'])} "
                f"| {fmt_int(median(rps))} ({fmt_int(min(rps))}–{fmt_int(max(rps))}) "
                f"| **{median(cpu):.1f}** ({min(cpu):.1f}–{max(cpu):.1f}) "
                f"| {median([r['user_us'] for r in rs]):.1f} / {median([r['sys_us'] for r in rs]):.1f} "
                f"| {median(org):.1f} ({min(org):.1f}–{max(org):.1f}) "
                f"| {'yes' if ok and not dropped else ('**no** (dropped, see the notes)' if dropped else '**no** (informational row)' if informational else '**no: INVALID**')} | {median([r['other_cpu_pct'] for r in rs]):.0f}% |"
            )
        by = {(r["target"], r["round"]): r for r in rows if r["kind"] == kind}
        for ours, key in (("chatwoot-cache", kind), ("chatwoot-cache-1w", kind + "-1w")):
            per_round = [
                ratio(by[(ours, rnd)]["cpu_us"], by[("nginx-cache", rnd)]["cpu_us"])
                for (t, rnd) in sorted(by, key=lambda k: k[1])
                if t == ours and ("nginx-cache", rnd) in by
            ]
            summary[key] = [x for x in per_round if x is not None]
    return L, summary, invalid


def table(raw, machine_path, out, warm_path=None, fill_path=None):
    raw_rows = load(raw)
    rows = aggregate(raw_rows)
    try:
        with open(machine_path) as f:
            m = json.load(f)
    except (OSError, ValueError):
        m = {}
    rows.sort(
        key=lambda r: (
            WORKLOAD_ORDER.index(r["workload"]) if r["workload"] in WORKLOAD_ORDER else 99,
            TARGET_ORDER.index(r["target"]) if r["target"] in TARGET_ORDER else 99,
        )
    )
    L = []
    L.append("# chatwoot-cache load benchmark (issues 5 and 15)")
    L.append("")
    L.append(
        f"Machine: {m.get('nproc', '?')} CPUs, {m.get('cpu_model', '?')}, kernel {m.get('kernel', '?')}. "
        f"Run {m.get('date', '?')}, git {m.get('git', '?')}, {m.get('nginx', 'nginx ?')}, "
        f"{m.get('varnish', 'varnish ?')}. "
        f"Load average at start {m.get('loadavg_start', '?')}, at end {m.get('loadavg_end', '?')}."
    )
    L.append("")
    L.append(
        f"Client for every target: `{m.get('wrk', 'wrk')}`, {m.get('rounds', 1)} rounds per target interleaved "
        "with the other targets of the workload (median round shown; CPU/request pooled over the rounds), "
        "one token and 100 conversations "
        f"(many tokens: {m.get('many_tokens', 1000)} tokens x {m.get('convs', 100)} conversations); "
        "wrk, servers and the fake origin share this machine."
    )
    L.append("")
    L.append(
        "| workload | target | req/s (median) | req/s range | p50 ms | p99 ms | µs CPU/req (server) | µs CPU/req (origin) "
        "| origin reqs (new conns) | body bytes | non-200 / socket errors | wrk CPU | other CPU |"
    )
    L.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        origin_cpu = f"{r['origin_cpu_us']:.1f}" if r["origin_cpu_us"] is not None else "–"
        origin_reqs = (
            f"{fmt_int(r['origin_requests'])} ({fmt_int(r.get('origin_connections', 0))})"
            if r["uses_origin"]
            else "–"
        )
        bad = f"{r['non200']} / {r['socket_errors']}"
        if r["bad"]:
            bad = f"**{bad} INVALID**"
        L.append(
            f"| {WORKLOAD_LABEL.get(r['workload'], r['workload'])} "
            f"| {TARGET_LABEL.get(r['target'], r['target'])} "
            f"| {fmt_int(r['rps'])} | {fmt_int(r['rps_min'])}–{fmt_int(r['rps_max'])} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['cpu_us']:.1f} "
            f"| {origin_cpu} | {origin_reqs} | {fmt_int(r['min_body'])}–{fmt_int(r['max_body'])} "
            f"| {bad} | {r['wrk_cpu_pct']:.0f}% | {r['other_cpu_pct']:.0f}% |"
        )
    L.append("")

    hp = find(rows, "hit", "chatwoot-cache")
    hn = find(rows, "hit", "nginx-cache")
    hv = find(rows, "hit", "varnish")
    hf = find(rows, "hit", "floor")
    mp = find(rows, "miss", "chatwoot-cache")
    mn = find(rows, "miss", "nginx-pass")
    gp = find(rows, "hit-gzip", "chatwoot-cache")
    gn = find(rows, "hit-gzip", "nginx-cache")
    gv = find(rows, "hit-gzip", "varnish")
    gf = find(rows, "hit-gzip", "floor")
    # (name, pooled value, op, goal, per-round ratios)
    rr = lambda wl, a, b, key: round_ratios(raw_rows, wl, a, b, key)  # noqa: E731
    goals = [
        ("hit throughput, chatwoot-cache / nginx proxy_cache", hp and hn and ratio(hp["rps"], hn["rps"]), ">=", 1.5,
         rr("hit", "chatwoot-cache", "nginx-cache", "rps")),
        ("hit CPU/request, chatwoot-cache / bare floor", hp and hf and ratio(hp["cpu_us"], hf["cpu_us"]), "<=", 1.3,
         rr("hit", "chatwoot-cache", "floor", "cpu_us")),
        ("hit CPU/request, chatwoot-cache / nginx proxy_cache", hp and hn and ratio(hp["cpu_us"], hn["cpu_us"]), "<=",
         None, rr("hit", "chatwoot-cache", "nginx-cache", "cpu_us")),
        ("hit p99, chatwoot-cache / nginx proxy_cache", hp and hn and ratio(hp["p99_ms"], hn["p99_ms"]), "<=", None,
         rr("hit", "chatwoot-cache", "nginx-cache", "p99_ms")),
        # issue 5's title: "beat nginx proxy_cache and Varnish on cache hits"
        ("hit throughput, chatwoot-cache / Varnish", hp and hv and ratio(hp["rps"], hv["rps"]), ">", 1.0,
         rr("hit", "chatwoot-cache", "varnish", "rps")),
        ("hit CPU/request, chatwoot-cache / Varnish", hp and hv and ratio(hp["cpu_us"], hv["cpu_us"]), "<=", None,
         rr("hit", "chatwoot-cache", "varnish", "cpu_us")),
        ("hit p99, chatwoot-cache / Varnish", hp and hv and ratio(hp["p99_ms"], hv["p99_ms"]), "<=", None,
         rr("hit", "chatwoot-cache", "varnish", "p99_ms")),
        ("miss CPU/request, chatwoot-cache / nginx proxy_pass", mp and mn and ratio(mp["cpu_us"], mn["cpu_us"]), "<=", 1.0,
         rr("miss", "chatwoot-cache", "nginx-pass", "cpu_us")),
        # issue 15: gzip clients' hits (no goal of their own: shown beside the identity goals)
        ("gzip hit CPU/request, chatwoot-cache / bare floor (gzip)", gp and gf and ratio(gp["cpu_us"], gf["cpu_us"]),
         "<=", None, rr("hit-gzip", "chatwoot-cache", "floor", "cpu_us")),
        ("gzip hit throughput, chatwoot-cache / bare floor (gzip)", gp and gf and ratio(gp["rps"], gf["rps"]),
         ">=", None, rr("hit-gzip", "chatwoot-cache", "floor", "rps")),
        ("gzip hit CPU/request, chatwoot-cache / nginx proxy_cache", gp and gn and ratio(gp["cpu_us"], gn["cpu_us"]),
         "<=", None, rr("hit-gzip", "chatwoot-cache", "nginx-cache", "cpu_us")),
        ("gzip hit throughput, chatwoot-cache / nginx proxy_cache", gp and gn and ratio(gp["rps"], gn["rps"]),
         ">=", None, rr("hit-gzip", "chatwoot-cache", "nginx-cache", "rps")),
        ("gzip hit throughput, chatwoot-cache / Varnish", gp and gv and ratio(gp["rps"], gv["rps"]),
         ">=", None, rr("hit-gzip", "chatwoot-cache", "varnish", "rps")),
    ]
    L.append(
        "Goal ratios (this run only). 'pooled': CPU per request pooled over all rounds, req/s of the median "
        "round; 'per round': the ratio within each round (the targets of a round run back to back), median "
        "and range. Goals are judged on the per-round median."
    )
    L.append("")
    L.append("| ratio | pooled | per round: median (range) | goal | met |")
    L.append("|---|---:|---:|---:|---|")
    for name, v, op, goal, per_round in goals:
        judged = median(per_round) if per_round else v
        pooled = "n/a" if v is None else f"{v:.2f}x"
        if judged is None:
            L.append(f"| {name} | n/a | n/a | {'–' if goal is None else f'{op} {goal}x'} | n/a |")
            continue
        if goal is None:
            better = "higher is better" if op == ">=" else "lower is better"
            L.append(f"| {name} | {pooled} | {spread(per_round)} | {better} | (informational) |")
            continue
        ok = {">=": judged >= goal, ">": judged > goal, "<=": judged <= goal}[op]
        L.append(f"| {name} | {pooled} | {spread(per_round)} | {op} {goal}x | {'yes' if ok else '**no**'} |")
    fill_lines, fill_summary, fill_invalid = ([], {}, False)
    if fill_path:
        try:
            fill_lines, fill_summary, fill_invalid = fill_section(fill_path, m)
        except (OSError, ValueError, KeyError):
            fill_lines, fill_summary, fill_invalid = ([], {}, True)
    for kind in ("identity", "gzip"):
        xs = fill_summary.get(kind)
        if xs:
            v = median(xs)
            L.append(
                f"| stored miss CPU/request, chatwoot-cache / nginx proxy_cache, {kind} clients | – | {spread(xs)} "
                f"| <= 1.3x (target 1.0x) | {'yes' if v <= 1.3 else '**no**'}{' (1.0x met)' if v <= 1.0 else ''} |"
            )
        xs = fill_summary.get(kind + "-1w")
        if xs:
            # The same binary limited to one tokio worker thread: nginx's envelope (1 worker
            # process), not the default; shown beside the judged row, never instead of it.
            L.append(
                f"| stored miss CPU/request, chatwoot-cache with 1 worker thread / nginx proxy_cache, {kind} "
                f"clients | – | {spread(xs)} | lower is better | (informational) |"
            )
    extra = []
    for wl in ("mixed", "many"):
        p = find(rows, wl, "chatwoot-cache")
        for ref in ("nginx-cache", "varnish"):
            n = find(rows, wl, ref)
            if p and n:
                extra.append(
                    f"{WORKLOAD_LABEL[wl]}: throughput {ratio(p['rps'], n['rps']):.2f}x, "
                    f"CPU/request {ratio(p['cpu_us'], n['cpu_us']):.2f}x, p99 {ratio(p['p99_ms'], n['p99_ms']):.2f}x "
                    f"of {TARGET_LABEL[ref]}"
                )
    if mp and mn and mp["origin_cpu_us"] is not None and mn["origin_cpu_us"] is not None:
        extra.append(
            f"miss: origin CPU/request behind chatwoot-cache {mp['origin_cpu_us']:.1f} µs vs behind nginx "
            f"{mn['origin_cpu_us']:.1f} µs (the origin's own cost; not part of the ratio)"
        )
    if extra:
        L.append("")
        L.extend(f"- {x}" for x in extra)
    warm = []
    if warm_path:
        try:
            with open(warm_path) as f:
                warm = [json.loads(x) for x in f if x.strip()]
        except (OSError, ValueError):
            warm = []
    if fill_lines:
        L.append("")
        L.extend(fill_lines)
    warm = [w for w in warm if w["tokens"] > 1]
    if warm:
        L.append("")
        L.append(
            "Cold fill before the many-tokens workload: every (token, conversation) requested once, all stored "
            "misses (`bench_origin walk`, same concurrency as wrk, not wrk itself):"
        )
        L.append("")
        L.append("| target | requests | seconds | req/s | µs CPU/req (server) | µs CPU/req (origin) | all 200 | X-Cache |")
        L.append("|---|---:|---:|---:|---:|---:|---|---|")
        for w in warm:
            n = max(w["walk"]["requests"], 1)
            secs = w["wall_ns"] / 1e9
            tck = w["clk_tck"]
            ok = w["walk"]["ok_200"] == w["walk"]["requests"] and not w["walk"]["errors"]
            L.append(
                f"| {TARGET_LABEL.get(w['target'], w['target'])} | {fmt_int(n)} | {secs:.1f} | {fmt_int(n / secs)} "
                f"| {w['server_ticks'] / tck * 1e6 / n:.1f} | {w['origin_ticks'] / tck * 1e6 / n:.1f} "
                f"| {'yes' if ok else '**no**'} | {', '.join(f'{k} {v}' for k, v in w['walk']['x_cache'].items())} |"
            )
    L.append("")
    L.append("Notes:")
    L.append("")
    L.append(
        "- µs CPU/req = (utime+stime delta over the wrk run, from /proc/<pid>/stat, in CLK_TCK ticks) / requests. "
        "nginx = master + worker (+ cache manager/loader); Varnish = manager + child (all its threads); "
        "chatwoot-cache = its one process; the origin is counted "
        "separately. Kernel softirq work done outside the process is not included for anyone."
    )
    L.append(
        "- chatwoot-cache runs with `--log-level warn`: its access log is info-level, so it is **off** here "
        "(nginx runs with `access_log off`). With the default `--log-level info` every request also writes a log line."
    )
    L.append(
        f"- chatwoot-cache: `--cache-ttl {m.get('cache_ttl', '?')} --cache-max-bytes 4GiB`; nginx: "
        f"`proxy_cache_valid 200 {m.get('cache_ttl', '?')}` (the same freshness, so no workload measures expiry), "
        "`proxy_cache_lock`, `proxy_cache_use_stale updating` + `proxy_cache_background_update` (its equivalent of "
        "stale-while-revalidate), key `$request_method|$uri|$http_api_access_token|$cwc_encoding_class`, "
        "1 worker, its cache directory on tmpfs when the machine has /dev/shm; Varnish: "
        f"`-s malloc,4G`, `beresp.ttl = {m.get('cache_ttl', '?')}` for 200s on the conversation route "
        "(Cache-Control private/max-age=0 overridden), grace 1h (stale-while-revalidate), keep 1h, its "
        "default request coalescing, hash `req.url` + `api_access_token` + the Accept-Encoding class, "
        "everything else `pass`, `http_gzip_support=off` "
        "(benches/load/varnish.vcl.template), per-request records of its shared-memory log masked "
        "(`vsl_mask`, its access log). "
        "'origin reqs' counts requests that reached the fake origin during the run (≈0 for a pure hit run), "
        "'new conns' the connections it accepted meanwhile (≈0 when keep-alive to the origin works)."
    )
    L.append(
        "- bare hyper floor = `bench_origin floor`: the same hyper HTTP/1.1 server stack returning one prebuilt ~8 KB "
        "conversation from memory (no routing, no token check)."
    )
    L.append(
        "- 'other CPU' = machine-wide busy CPU not used by the measured server, the origin or wrk, as a share of all "
        "CPUs (other processes such as concurrent builds, plus kernel work). Well above ~5% means the numbers are noisy."
    )
    if int(m.get("proxy_log_lines", 0) or 0):
        sample = str(m.get("proxy_log_sample", "")).replace("`", "'").replace("|", "/")
        L.append(
            f"- **chatwoot-cache wrote {m['proxy_log_lines']} line(s) to stderr** at `--log-level warn` "
            f"(expected none; writing them costs CPU in every row above). First: `{sample}`"
        )
    if m.get("proxy1_dropped"):
        L.append(
            "- **chatwoot-cache with 1 worker thread was dropped from the stored-miss rounds**: "
            f"{str(m['proxy1_dropped']).replace('|', '/')}. Its rows (informational), if any, hold only "
            "the rounds it completed before; the failed round is not in them."
        )
    if int(m.get("nginx_error_lines", 0) or 0):
        L.append(f"- nginx logged {m['nginx_error_lines']} error line(s) during the run.")
    if int(m.get("varnish_restart_lines", 0) or 0):
        L.append(
            f"- **varnishd logged {m['varnish_restart_lines']} child panic/restart line(s)** during the run "
            "(a restarted child starts with an empty cache)."
        )
    L.append(
        "- hit, gzip clients: wrk sends `Accept-Encoding: gzip`; every 200 must carry `Content-Encoding: gzip` "
        "(checked per answer; before the run, every target's answer was checked to be the origin's gzip bytes, "
        "same size, decoding to the identity body). The floor is `bench_origin floor --encoding gzip`. nginx and "
        "Varnish key per token and Accept-Encoding class and ask the origin for that class; they store and "
        "replay its gzip bytes (libdeflate level 1, as chatwoot-cache stores them) and compress nothing. "
        "'body bytes' is the smallest and largest 200 body over the rounds."
    )
    for r in rows:
        if r["workload"] in ("hit", "hit-gzip", "many") and r["target"] in ("nginx-cache", "varnish", "chatwoot-cache"):
            other = {k: v for k, v in r["x_cache_sampled"].items() if k != "HIT"}
            if other:
                L.append(
                    f"- {r['workload']}/{r['target']}: not every answer was a cache hit (sampled X-Cache: "
                    f"{r['x_cache_sampled']})."
                )
    L.append(
        "- nginx runs 1 worker process (the setup issue 5 asks for), so it uses one CPU at most; Varnish is threaded "
        "(2 thread pools of 100–1000 threads) and chatwoot-cache's tokio runtime and the origin/floor use a worker "
        f"thread per CPU: those can use all {m.get('nproc', '?')} CPUs. On this machine wrk shares the same CPUs."
    )
    invalid = [r for r in rows if r["bad"]]
    if invalid:
        L.append(
            "- **INVALID rows** (non-200 answers, answers in the wrong coding, or socket errors): "
            + ", ".join(f"{r['workload']}/{r['target']}" for r in invalid)
        )
    if fill_invalid:
        L.append("- **INVALID stored-miss rounds**: not every request was a 200 stored miss (see the table).")
    L.append("")
    text = "\n".join(L)
    with open(out, "w") as f:
        f.write(text)
    return 3 if invalid or fill_invalid else 0


def plot(raw, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = aggregate(load(raw))
    workloads = [w for w in WORKLOAD_ORDER if any(r["workload"] == w for r in rows)]
    metrics = [("rps", "req/s, median round; bars: range (higher is better)"), ("p99_ms", "p99 latency, ms (lower is better)"),
               ("cpu_us", "server µs CPU / request (lower is better)")]
    colors = {"floor": "#999999", "origin-direct": "#bbbbbb", "nginx-cache": "#2a9d8f",
              "nginx-pass": "#8ab17d", "varnish": "#6a4c93", "chatwoot-cache": "#e76f51"}
    fig, axes = plt.subplots(1, len(metrics), figsize=(16, 5))
    for ax, (key, title) in zip(axes, metrics):
        x = 0.0
        ticks, labels = [], []
        for w in workloads:
            group = [r for r in rows if r["workload"] == w]
            group.sort(key=lambda r: TARGET_ORDER.index(r["target"]) if r["target"] in TARGET_ORDER else 99)
            start = x
            for r in group:
                yerr = None
                if key == "rps":
                    yerr = [[r["rps"] - r["rps_min"]], [r["rps_max"] - r["rps"]]]
                ax.bar(x, r[key], width=0.8, color=colors.get(r["target"], "#555555"),
                       label=TARGET_LABEL.get(r["target"], r["target"]), yerr=yerr, capsize=3,
                       error_kw={"elinewidth": 0.8, "ecolor": "#333333"})
                if key == "rps":
                    # inside the bar, clear of the range whiskers
                    ax.text(x, r[key] * 0.03, f"{r[key]:,.0f}", ha="center", va="bottom", fontsize=7,
                            rotation=90, color="white")
                else:
                    ax.text(x, r[key], f"{r[key]:.2f}" if key == "p99_ms" else f"{r[key]:.1f}",
                            ha="center", va="bottom", fontsize=7)
                x += 1
            ticks.append((start + x - 1) / 2)
            # two lines, so neighbouring labels do not run into each other
            labels.append(WORKLOAD_LABEL.get(w, w).replace(", ", "\n").replace(" (", "\n("))
            x += 0.8
        ax.set_xticks(ticks)
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.margins(y=0.15)
    handles, labels = [], []
    for ax in axes:
        for h, l in zip(*ax.get_legend_handles_labels()):
            if l not in labels:
                handles.append(h)
                labels.append(l)
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    fig.suptitle("chatwoot-cache vs nginx vs Varnish vs bare hyper floor (one run, same machine)", fontsize=11)
    fig.tight_layout(rect=(0, 0.07, 1, 0.95))
    fig.savefig(out, dpi=110)
    return 0


def main(argv):
    if len(argv) >= 2 and argv[0] == "line":
        line(argv[1])
        return 0
    if len(argv) >= 2 and argv[0] == "fill-line":
        fill_line(argv[1])
        return 0
    if len(argv) in (4, 5, 6) and argv[0] == "table":
        return table(*argv[1:])
    if len(argv) == 3 and argv[0] == "plot":
        return plot(argv[1], argv[2])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

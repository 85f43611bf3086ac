#!/usr/bin/env python3
"""Offline checks of deploy/, run by deploy/validate.sh (which installs the
tools and renders the overlays first). Standalone use:

    validate.py manifests --deploy DIR --overlay NAME --rendered FILE \
        --rules-out FILE [--test-rules-out FILE] --kube-version 1.30 ...
    validate.py dashboard --deploy DIR FILE
    validate.py test-series --deploy DIR FILE

What it checks:
  * every rendered object against the Kubernetes OpenAPI schema
    (kubernetes-validate, strict: unknown fields fail) for each version given;
    the Prometheus Operator kinds (no bundled schema) get a structural check;
  * cross-references: Service/ServiceMonitor/PodMonitor/PDB selectors, named
    ports, probes, the config file mount, Secret keys, HPA target;
  * the proxy's TOML config (keys = the proxy's flag names, value
    syntax) and the invariants the manifests promise: loopback listener for
    the sidecar, memory limit vs cache_max_bytes, grace period vs preStop +
    shutdown_timeout, the hardened securityContext;
  * every PromQL expression (rules, dashboard, test series) uses only metric
    names from deploy/metrics.txt (plus _bucket/_sum/_count of the two
    histograms), the labels the proxy exports and valid label values;
  * the capacity alert's constant equals the overlay's cache_max_bytes;
  * every container has an image; a NetworkPolicy keeps the gateway's admin
    port from every peer but the allowed ones; the upstream URL comes from
    components/upstream only;
  * with --monitoring off, that no Prometheus Operator object or dashboard is
    left in the render (monitoring is truly optional).

Prints one line per finding; exits 1 if anything failed.
"""

from __future__ import annotations

import argparse
import copy
import json
import pathlib
import re
import sys

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11: validate.sh installs tomli
    import tomli as tomllib

import yaml

# ---------------------------------------------------------------------------
# What the proxy accepts and exports (its flags, metrics and labels)
# ---------------------------------------------------------------------------

# --flag-name -> kind of value. TOML key = flag name with "_" for "-".
FLAGS = {
    "upstream": "url",
    "listen": "addr",
    "admin-listen": "addr",
    "token-header": "str",
    "cache-ttl": "duration",
    "stale-while-revalidate": "duration",
    "stale-if-error": "duration",
    "negative-ttl": "duration",
    "auth-negative-ttl": "duration",
    "cache-max-bytes": "size",
    "max-object-bytes": "size",
    "upstream-timeout": "duration",
    "upstream-connect-timeout": "duration",
    "upstream-max-in-flight": "int",
    "upstream-max-in-flight-per-token": "count0",
    "rate-limit-per-token": "rate",
    "rate-limit-burst": "int",
    "refresh-ahead": "share",
    "refresh-ahead-min-hits": "int",
    "upstream-queue-timeout": "duration",
    "breaker-window": "duration",
    "breaker-min-requests": "int",
    "breaker-failure-ratio": "ratio",
    "breaker-open": "duration",
    "upstream-ca-file": "str",
    "tls-cert-file": "str",
    "tls-key-file": "str",
    "upstream-client-cert-file": "str",
    "upstream-client-key-file": "str",
    "admin-token": "secret",
    "webhook-secret": "secret",
    "admin-token-file": "str",
    "webhook-secret-file": "str",
    "webhook-secrets-file": "str",
    "reload-interval": "duration",
    "redis-url": "secret",
    "redis-ca-file": "str",
    "redis-timeout": "duration",
    "redis-key-prefix": "str",
    "scope-secret": "secret",
    "shutdown-timeout": "duration",
    "client-header-timeout": "duration",
    "log-format": "logformat",
    "log-level": "str",
}
DEFAULTS = {
    "listen": "0.0.0.0:8080",
    "admin-listen": "0.0.0.0:9090",
    "cache-max-bytes": "256MiB",
    "shutdown-timeout": "25s",
}
ENV_PREFIX = "CHATWOOT_CACHE_"
PROXY_CONTAINER = "chatwoot-cache"
PROXY_UID = 65532

# metric -> labels; names are cross-checked with metrics.txt.
METRIC_LABELS = {
    "chatwoot_cache_requests_total": {"route", "cache", "status"},
    "chatwoot_cache_request_duration_seconds": {"route", "cache"},
    "chatwoot_cache_upstream_requests_total": {"route", "status"},
    "chatwoot_cache_upstream_request_duration_seconds": {"route"},
    "chatwoot_cache_upstream_in_flight": set(),
    "chatwoot_cache_entries": set(),
    "chatwoot_cache_stored_bytes": set(),
    "chatwoot_cache_evictions_total": {"cause"},
    "chatwoot_cache_coalesced_total": set(),
    "chatwoot_cache_revalidations_total": {"outcome"},
    "chatwoot_cache_refresh_ahead_total": {"outcome"},
    "chatwoot_cache_invalidations_total": {"source"},
    "chatwoot_cache_shed_total": {"reason"},
    "chatwoot_cache_breaker_state": set(),
    "chatwoot_cache_auth_rejections_total": {"reason"},
    "chatwoot_cache_config_reloads_total": {"result"},
    "chatwoot_cache_tls_cert_expiry_timestamp_seconds": {"listener"},
    # the shared tier (only with --redis-url)
    "chatwoot_cache_redis_up": set(),
    "chatwoot_cache_redis_errors_total": {"op"},
    "chatwoot_cache_redis_duration_seconds": {"op"},
    "chatwoot_cache_l2_requests_total": {"result"},
    "chatwoot_cache_bus_messages_total": {"direction"},
    "chatwoot_cache_bus_subscribed": set(),
}
HISTOGRAMS = {
    "chatwoot_cache_request_duration_seconds",
    "chatwoot_cache_upstream_request_duration_seconds",
    "chatwoot_cache_redis_duration_seconds",
}
STATUS = {"2xx", "3xx", "4xx", "5xx"}
LABEL_VALUES = {
    ("*", "route"): {"conversation", "protected", "other"},
    ("*", "cache"): {"hit", "stale", "revalidated", "miss", "bypass", "local"},
    ("chatwoot_cache_requests_total", "status"): STATUS,
    ("chatwoot_cache_upstream_requests_total", "status"): STATUS | {"error"},
    ("*", "cause"): {"size", "expired", "explicit", "replaced"},
    ("*", "outcome"): {"not_modified", "unchanged", "changed", "older", "error"},
    ("*", "source"): {"write", "purge", "webhook"},
    ("chatwoot_cache_shed_total", "reason"): {"queue_timeout", "breaker_open", "token_quota", "rate_limited"},
    ("chatwoot_cache_auth_rejections_total", "reason"): {"missing", "malformed", "invalid"},
    ("chatwoot_cache_config_reloads_total", "result"): {"ok", "error"},
    ("*", "listener"): {"public", "upstream_client"},
    ("*", "op"): {"read", "write", "invalidate", "purge", "lease", "probe", "subscribe"},
    ("chatwoot_cache_l2_requests_total", "result"): {"hit", "miss", "error", "skipped"},
    ("*", "direction"): {"sent", "received"},
}
# Labels Prometheus adds from the scrape target.
TARGET_LABELS = {"namespace", "job", "pod", "instance", "service", "container", "endpoint"}

# Kinds without a bundled schema: structurally checked here instead.
CRD_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PodMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
}

PROMQL_FUNCS = {
    "abs", "absent", "absent_over_time", "avg", "avg_over_time", "bottomk", "ceil", "changes", "clamp",
    "clamp_max", "clamp_min", "count", "count_over_time", "count_values", "day_of_month", "day_of_week",
    "delta", "deriv", "exp", "floor", "group", "histogram_quantile", "holt_winters", "idelta", "increase",
    "irate", "label_join", "label_replace", "last_over_time", "ln", "log2", "log10", "max", "max_over_time",
    "min", "min_over_time", "predict_linear", "present_over_time", "quantile", "quantile_over_time", "rate",
    "resets", "round", "scalar", "sgn", "sort", "sort_desc", "sqrt", "stddev", "stddev_over_time", "stdvar",
    "stdvar_over_time", "sum", "sum_over_time", "time", "timestamp", "topk", "vector",
    # Grafana template query function
    "label_values",
}
PROMQL_CLAUSES = {"by", "without", "on", "ignoring", "group_left", "group_right"}
PROMQL_AGGREGATIONS = {"sum", "min", "max", "avg", "count", "group", "stddev", "stdvar", "topk", "bottomk",
                       "quantile", "count_values"}
PROMQL_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "atan2"}


class Report:
    def __init__(self) -> None:
        self.failures = 0

    def fail(self, where: str, msg: str) -> None:
        self.failures += 1
        print(f"FAIL {where}: {msg}")

    def ok(self, msg: str) -> None:
        print(f"  ok {msg}")


R = Report()


def load_allowlist(deploy: pathlib.Path) -> set[str]:
    names = set()
    for line in (deploy / "metrics.txt").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            names.add(line)
    if names != set(METRIC_LABELS):
        R.fail("metrics.txt", f"differs from the label table in validate.py: "
               f"only in file {sorted(names - set(METRIC_LABELS))}, only in script {sorted(set(METRIC_LABELS) - names)}")
    return names


# ---------------------------------------------------------------------------
# PromQL: a small scanner, enough to find metric names, matchers and labels
# ---------------------------------------------------------------------------

TOKEN_RE = re.compile(r"""
    (?P<ws>\s+|\#[^\n]*)
  | (?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<var>\$\{[^}]*\}|\$\w+)
  | (?P<dur>(?:\d+(?:ms|s|m|h|d|w|y))+(?![\w.]))
  | (?P<num>0x[0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<ident>[A-Za-z_:][\w:]*)
  | (?P<op>=~|!~|!=|==|<=|>=|[-+*/%^@=<>(){}\[\],:])
""", re.VERBOSE)


def tokenize(expr: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(expr):
        m = TOKEN_RE.match(expr, pos)
        if not m:
            raise ValueError(f"cannot tokenize at {expr[pos:pos + 20]!r}")
        pos = m.end()
        kind = m.lastgroup
        if kind != "ws":
            out.append((kind, m.group()))
    return out


def base_metric(name: str, allow: set[str]) -> tuple[str | None, bool]:
    """(exported metric, is_bucket) for an allowed series name, else (None, False)."""
    if name in allow:
        return name, False
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and name[: -len(suffix)] in HISTOGRAMS & allow:
            return name[: -len(suffix)], suffix == "_bucket"
    return None, False


def allowed_values(metric: str, label: str) -> set[str] | None:
    return LABEL_VALUES.get((metric, label), LABEL_VALUES.get(("*", label)))


def check_matcher(where: str, metric: str | None, is_bucket: bool, label: str, op: str, raw: str) -> None:
    value = raw[1:-1]
    if label == "__name__":
        R.fail(where, "__name__ matchers are not allowed (metric names must be literal)")
        return
    if metric is None:
        if label not in TARGET_LABELS and not any(label in v for v in METRIC_LABELS.values()):
            R.fail(where, f"unknown label {label!r}")
        return
    allowed = METRIC_LABELS[metric] | TARGET_LABELS | ({"le"} if is_bucket else set())
    if label not in allowed:
        R.fail(where, f"{metric} has no label {label!r} (allowed: {sorted(allowed)})")
        return
    values = allowed_values(metric, label)
    if values is None or "$" in value:
        return
    if op in ("=", "!="):
        candidates = [value]
    elif re.fullmatch(r"[\w]+(\|[\w]+)*", value):
        candidates = value.split("|")
    else:
        return  # a real regex: not checked
    for v in candidates:
        if v not in values:
            R.fail(where, f"{metric}{{{label}}} never has value {v!r} (values: {sorted(values)})")


def check_promql(where: str, expr: str, allow: set[str]) -> set[str]:
    """Checks one expression; returns the exported metrics it uses."""
    used: set[str] = set()
    try:
        toks = tokenize(expr)
    except ValueError as e:
        R.fail(where, str(e))
        return used
    all_labels = set().union(*METRIC_LABELS.values()) | TARGET_LABELS | {"le"}
    i = 0
    while i < len(toks):
        kind, text = toks[i]
        nxt = toks[i + 1][1] if i + 1 < len(toks) else None
        if kind == "op" and text == "[":
            # range or subquery: skip to the matching bracket
            while i < len(toks) and toks[i][1] != "]":
                i += 1
            i += 1
            continue
        if kind != "ident":
            i += 1
            continue
        if text in PROMQL_CLAUSES:
            i += 1
            if i < len(toks) and toks[i][1] == "(":
                i += 1
                while i < len(toks) and toks[i][1] != ")":
                    if toks[i][0] == "ident" and toks[i][1] not in all_labels:
                        R.fail(where, f"{text}(...) uses unknown label {toks[i][1]!r}")
                    i += 1
                i += 1
            continue
        if text in PROMQL_KEYWORDS:
            i += 1
            continue
        if text in PROMQL_AGGREGATIONS and nxt in ("by", "without"):
            i += 1  # `sum by (...) (...)`: the clause is handled next
            continue
        if nxt == "(":
            if text not in PROMQL_FUNCS:
                R.fail(where, f"unknown function {text!r}")
            if text == "label_values":
                # label_values(selector, label): the last identifier before ')' is a label
                j, depth = i + 2, 1
                last_comma = None
                while j < len(toks) and depth:
                    t = toks[j][1]
                    depth += t == "("
                    depth -= t == ")"
                    if t == "," and depth == 1:
                        last_comma = j
                    j += 1
                if last_comma is not None and toks[last_comma + 1][0] == "ident":
                    lbl = toks[last_comma + 1][1]
                    if lbl not in all_labels:
                        R.fail(where, f"label_values(..., {lbl}): unknown label")
                    toks = toks[: last_comma + 1] + [("op", "_")] + toks[last_comma + 2:]
            i += 1
            continue
        # a metric name
        metric, is_bucket = base_metric(text, allow)
        if metric is None:
            R.fail(where, f"metric {text!r} is not in deploy/metrics.txt")
        else:
            used.add(metric)
        i += 1
        if i < len(toks) and toks[i][1] == "{":
            i += 1
            while i < len(toks) and toks[i][1] != "}":
                if toks[i][0] == "ident" and i + 2 < len(toks) and toks[i + 2][0] == "str":
                    check_matcher(where, metric, is_bucket, toks[i][1], toks[i + 1][1], toks[i + 2][1])
                    i += 3
                else:
                    i += 1
            i += 1
    if not used and "vector(" not in expr.replace(" ", ""):
        R.fail(where, "expression uses no chatwoot_cache_* metric")
    return used


# ---------------------------------------------------------------------------
# Value parsing
# ---------------------------------------------------------------------------

def parse_duration(s: str) -> float | None:
    m = re.fullmatch(r"(\d+)(ms|s|m|h)", s)
    if not m:
        return None
    return int(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def parse_size(s: str) -> int | None:
    m = re.fullmatch(r"(\d+)(KiB|MiB|GiB)", s)
    if not m:
        return None
    return int(m.group(1)) * {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}[m.group(2)]


def parse_quantity(s) -> float | None:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|k|M|G|T|m)?", str(s))
    if not m:
        return None
    mult = {None: 1, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40,
            "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "m": 1e-3}[m.group(2)]
    return float(m.group(1)) * mult


def check_value(where: str, key: str, value) -> None:
    kind = FLAGS[key]
    bad = None
    if kind == "duration" and (not isinstance(value, str) or parse_duration(value) is None):
        bad = "a duration string like \"250ms\", \"10s\", \"5m\", \"1h\""
    elif kind == "size" and (not isinstance(value, str) or parse_size(value) is None):
        bad = "a size string like \"512KiB\", \"256MiB\", \"1GiB\""
    elif kind == "int" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        bad = "a positive integer"
    elif kind == "count0" and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        bad = "an integer, 0 or more"
    elif kind == "rate" and (not isinstance(value, str) or not re.fullmatch(r"[1-9]\d*/[smh]", value)):
        bad = "a rate like \"20/s\" or \"600/m\""
    elif kind == "share" and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1):
        bad = "a number in [0, 1)"
    elif kind == "ratio" and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1):
        bad = "a number in (0, 1]"
    elif kind == "url" and (not isinstance(value, str) or not re.match(r"https?://[^/\s]+", value)):
        bad = "an http:// or https:// URL"
    elif kind == "addr" and (not isinstance(value, str) or not re.fullmatch(r"(\[[0-9a-fA-F:]+\]|[\w.-]+):\d{1,5}", value)):
        bad = "HOST:PORT"
    elif kind == "logformat" and value not in ("text", "json"):
        bad = "text or json"
    elif kind == "str" and not isinstance(value, str):
        bad = "a string"
    if bad:
        R.fail(where, f"{key.replace('-', '_')} = {value!r}: expected {bad}")


# ---------------------------------------------------------------------------
# Manifests
# ---------------------------------------------------------------------------

def labels_match(selector: dict, labels: dict) -> bool:
    ml = selector.get("matchLabels") or {}
    if not ml or selector.get("matchExpressions"):
        return False
    return all(labels.get(k) == v for k, v in ml.items())


def pod_templates(docs):
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet"):
            yield d, d["spec"]["template"]


def all_containers(podspec: dict):
    for c in podspec.get("initContainers", []) or []:
        yield c, True
    for c in podspec.get("containers", []) or []:
        yield c, False


def schema_check(where: str, doc: dict, versions: list[str]) -> None:
    import kubernetes_validate.utils as kv

    for v in versions:
        try:
            kv.validate(doc, v, strict=True)
        except kv.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            R.fail(where, f"schema {v}: {path}: {e.message}")
        except kv.SchemaNotFoundError as e:
            R.fail(where, f"{e.message} (only the Prometheus Operator kinds are allowed to lack a schema)")


CRD_FIELDS = {
    "ServiceMonitor": ({"selector", "endpoints", "namespaceSelector", "jobLabel", "targetLabels", "podTargetLabels"},
                       "endpoints", {"port", "path", "scheme", "interval", "scrapeTimeout", "honorLabels",
                                     "relabelings", "metricRelabelings", "tlsConfig", "bearerTokenSecret",
                                     "authorization", "params", "targetPort"}),
    "PodMonitor": ({"selector", "podMetricsEndpoints", "namespaceSelector", "jobLabel", "podTargetLabels"},
                   "podMetricsEndpoints", {"port", "portNumber", "path", "scheme", "interval", "scrapeTimeout",
                                           "honorLabels", "relabelings", "metricRelabelings", "tlsConfig",
                                           "authorization", "params", "targetPort"}),
}


def crd_check(where: str, doc: dict) -> None:
    kind, spec = doc["kind"], doc.get("spec") or {}
    if set(doc) - {"apiVersion", "kind", "metadata", "spec"}:
        R.fail(where, f"unexpected top-level fields {sorted(set(doc) - {'apiVersion', 'kind', 'metadata', 'spec'})}")
    if kind in CRD_FIELDS:
        spec_fields, ep_key, ep_fields = CRD_FIELDS[kind]
        if set(spec) - spec_fields:
            R.fail(where, f"unknown spec fields {sorted(set(spec) - spec_fields)}")
        if not spec.get(ep_key):
            R.fail(where, f"spec.{ep_key} is empty")
        for ep in spec.get(ep_key, []):
            if set(ep) - ep_fields:
                R.fail(where, f"unknown {ep_key} fields {sorted(set(ep) - ep_fields)}")
            if ep.get("path") != "/metrics":
                R.fail(where, f"scrape path is {ep.get('path')!r}, the proxy serves /metrics")
    elif kind == "PrometheusRule":
        groups = spec.get("groups") or []
        if not groups:
            R.fail(where, "no rule groups")
        names = set()
        for g in groups:
            extra = set(g) - {"name", "rules", "interval", "limit", "partial_response_strategy"}
            if extra:
                R.fail(where, f"group {g.get('name')}: unknown fields {sorted(extra)}")
            for r in g.get("rules") or []:
                if set(r) - {"alert", "record", "expr", "for", "keep_firing_for", "labels", "annotations"}:
                    R.fail(where, f"rule {r.get('alert')}: unknown fields")
                if "alert" not in r:
                    continue
                a = r["alert"]
                if a in names:
                    R.fail(where, f"duplicate alert {a}")
                names.add(a)
                if not (r.get("labels") or {}).get("severity"):
                    R.fail(where, f"{a}: no severity label")
                ann = r.get("annotations") or {}
                for k in ("summary", "description", "runbook"):
                    if not str(ann.get(k, "")).strip():
                        R.fail(where, f"{a}: annotation {k} missing")
                if len(str(ann.get("runbook", ""))) < 300 or "WHAT TO DO" not in str(ann.get("runbook", "")):
                    R.fail(where, f"{a}: runbook should say what it means, what to check and WHAT TO DO")


def check_proxy_container(where: str, docs, workload: dict, podspec: dict, c: dict, is_init: bool) -> dict:
    """Checks one chatwoot-cache container; returns its effective config."""
    cms = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    sidecar = is_init
    if is_init and c.get("restartPolicy") != "Always":
        R.fail(where, "chatwoot-cache as an initContainer must be a native sidecar (restartPolicy: Always)")

    image = c.get("image", "")
    if image.endswith(":latest") or ":" not in image.rsplit("/", 1)[-1]:
        R.fail(where, f"image {image!r} has no pinned tag")

    # --- args: --config FILE and flags
    args = list(c.get("args") or [])
    if c.get("command"):
        R.fail(where, "do not override the image ENTRYPOINT (command:); use args:")
    flags: dict[str, str] = {}
    config_path = None
    i = 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--"):
            R.fail(where, f"unexpected positional arg {a!r}")
            i += 1
            continue
        name, eq, val = a[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                R.fail(where, f"flag {a} has no value")
                break
            val = args[i + 1]
            i += 1
        i += 1
        if name == "config":
            config_path = val
        elif name in FLAGS:
            flags[name] = val
        else:
            R.fail(where, f"unknown flag --{name}")
    if not config_path:
        R.fail(where, "no --config FILE in args")
        return {}

    # --- the config file: mount -> volume -> ConfigMap key
    mount = next((m for m in c.get("volumeMounts", []) if config_path.startswith(m["mountPath"].rstrip("/") + "/")), None)
    if not mount:
        R.fail(where, f"{config_path} is not under any volumeMount")
        return {}
    if not mount.get("readOnly"):
        R.fail(where, f"volumeMount {mount['name']} must be readOnly")
    vol = next((v for v in podspec.get("volumes", []) if v["name"] == mount["name"]), None)
    if not vol or "configMap" not in vol:
        R.fail(where, f"volume {mount['name']} is not a configMap volume")
        return {}
    key = config_path[len(mount["mountPath"].rstrip("/")) + 1:]
    cm = cms.get(vol["configMap"]["name"])
    if not cm or key not in (cm.get("data") or {}):
        R.fail(where, f"ConfigMap {vol['configMap']['name']} with key {key} not in the render")
        return {}
    try:
        toml = tomllib.loads(cm["data"][key])
    except tomllib.TOMLDecodeError as e:
        R.fail(where, f"{key} in ConfigMap {cm['metadata']['name']}: {e}")
        return {}
    cfg: dict = {}
    for k, v in toml.items():
        flag = k.replace("_", "-")
        if "-" in k or flag not in FLAGS:
            R.fail(where, f"config key {k!r} is not a flag name with '_' for '-'")
            continue
        if FLAGS[flag] == "secret":
            R.fail(where, f"config key {k!r} is a secret: pass it from the Secret as {ENV_PREFIX}{k.upper()}")
        check_value(f"{where} {key}", flag, v)
        cfg[flag] = v
    # --- env: only known settings, secrets from existing Secret keys, ConfigMap keys resolved
    env_cfg: dict = {}
    for e in c.get("env", []) or []:
        n = e["name"]
        cm_ref = (e.get("valueFrom") or {}).get("configMapKeyRef")
        value = e.get("value")
        if cm_ref:
            ref_cm = cms.get(cm_ref["name"])
            if not ref_cm or cm_ref["key"] not in (ref_cm.get("data") or {}):
                R.fail(where, f"env {n}: ConfigMap {cm_ref['name']} with key {cm_ref['key']} not in the render")
            else:
                value = ref_cm["data"][cm_ref["key"]]
        if n.startswith(ENV_PREFIX):
            flag = n[len(ENV_PREFIX):].lower().replace("_", "-")
            if flag not in FLAGS:
                R.fail(where, f"env {n} is not a setting of the proxy")
            elif FLAGS[flag] == "secret" and "value" in e:
                R.fail(where, f"env {n} carries a secret inline; use secretKeyRef")
            elif value is not None:
                check_value(f"{where} env {n}", flag, value)
                env_cfg[flag] = value
    if "upstream" in cfg:
        R.fail(where, "config.toml sets upstream: set it in components/upstream/upstream.env only "
               "(the environment wins over the file, so two places would disagree silently)")
    if "upstream" not in cfg and "upstream" not in flags and "upstream" not in env_cfg:
        R.fail(where, "upstream is required and not set")
    for e in c.get("env", []) or []:
        ref = (e.get("valueFrom") or {}).get("secretKeyRef")
        if not ref:
            continue
        s = secrets.get(ref["name"])
        if s is None:
            # The Secret is created out of band on purpose (base/kustomization.yaml says why):
            # a reference to it must not keep the pod from starting before it exists.
            if not ref.get("optional"):
                R.fail(where, f"env {e['name']}: Secret {ref['name']} is not in the render, "
                       "so the reference must be optional: true")
        elif (
            ref["key"] not in (s.get("data") or {})
            and ref["key"] not in (s.get("stringData") or {})
            and not ref.get("optional")
        ):
            R.fail(where, f"env {e['name']}: Secret {ref['name']} has no key {ref['key']}")
    for ef in c.get("envFrom", []) or []:
        R.fail(where, "envFrom: list the proxy's variables explicitly")

    eff = dict(DEFAULTS)
    eff.update(cfg)
    eff.update(env_cfg)
    eff.update(flags)
    for k, v in flags.items():
        check_value(f"{where} args", k, v)

    # --- listeners, ports, probes
    listen_port = int(str(eff["listen"]).rsplit(":", 1)[1])
    admin_port = int(str(eff["admin-listen"]).rsplit(":", 1)[1])
    if sidecar and not str(eff["listen"]).startswith("127.0.0.1:"):
        R.fail(where, f"sidecar must listen on 127.0.0.1, not {eff['listen']}")
    ports = {p.get("name"): p["containerPort"] for p in c.get("ports", []) or []}
    if admin_port not in ports.values():
        R.fail(where, f"admin port {admin_port} is not a declared containerPort")
    if not sidecar and listen_port not in ports.values():
        R.fail(where, f"listen port {listen_port} is not a declared containerPort")
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        p = c.get(probe)
        if not p or "httpGet" not in p:
            R.fail(where, f"{probe} missing or not httpGet")
            continue
        hg = p["httpGet"]
        port = ports.get(hg["port"]) if isinstance(hg["port"], str) else hg["port"]
        if hg.get("path") != path or port != admin_port:
            R.fail(where, f"{probe} must GET {path} on the admin port {admin_port}, has {hg.get('path')} on {hg['port']}")

    # --- security context (container overrides pod)
    psc = podspec.get("securityContext") or {}
    csc = c.get("securityContext") or {}

    def eff_sc(k):
        return csc.get(k, psc.get(k))

    if eff_sc("runAsNonRoot") is not True:
        R.fail(where, "runAsNonRoot must be true")
    if eff_sc("runAsUser") != PROXY_UID:
        R.fail(where, f"runAsUser must be {PROXY_UID}")
    if csc.get("readOnlyRootFilesystem") is not True:
        R.fail(where, "readOnlyRootFilesystem must be true")
    if csc.get("allowPrivilegeEscalation") is not False:
        R.fail(where, "allowPrivilegeEscalation must be false")
    if "ALL" not in ((csc.get("capabilities") or {}).get("drop") or []):
        R.fail(where, "capabilities.drop must contain ALL")
    if (eff_sc("seccompProfile") or {}).get("type") != "RuntimeDefault":
        R.fail(where, "seccompProfile must be RuntimeDefault")

    # --- memory vs cache
    res = c.get("resources") or {}
    limit = parse_quantity((res.get("limits") or {}).get("memory", ""))
    request = parse_quantity((res.get("requests") or {}).get("memory", ""))
    cache = parse_size(str(eff["cache-max-bytes"]))
    if limit is None:
        R.fail(where, "no memory limit")
    elif cache is not None:
        if cache > 0.6 * limit:
            R.fail(where, f"cache_max_bytes {eff['cache-max-bytes']} is over 60% of the memory limit {res['limits']['memory']}")
        if request is None or request < cache:
            R.fail(where, f"memory request should cover a full cache ({eff['cache-max-bytes']})")
        else:
            R.ok(f"{where}: cache_max_bytes {eff['cache-max-bytes']} = {cache / limit:.0%} of memory limit {res['limits']['memory']}")
    if not (res.get("requests") or {}).get("cpu"):
        R.fail(where, "no CPU request")

    # --- shutdown timeline
    grace = podspec.get("terminationGracePeriodSeconds", 30)
    shutdown = parse_duration(str(eff["shutdown-timeout"])) or 0
    if sidecar:
        if grace < shutdown + 1:
            R.fail(where, f"terminationGracePeriodSeconds {grace} < shutdown_timeout {shutdown:g}s + 1")
        else:
            R.ok(f"{where}: grace {grace}s >= app shutdown + sidecar shutdown_timeout {shutdown:g}s")
    else:
        pre = ((c.get("lifecycle") or {}).get("preStop") or {}).get("sleep", {}).get("seconds")
        if pre is None:
            R.fail(where, "gateway container needs a preStop sleep (endpoint propagation before SIGTERM)")
            pre = 0
        if grace < pre + shutdown + 1:
            R.fail(where, f"terminationGracePeriodSeconds {grace} < preStop {pre} + shutdown_timeout {shutdown:g} + margin")
        else:
            R.ok(f"{where}: grace {grace}s >= preStop {pre}s + shutdown_timeout {shutdown:g}s + margin {grace - pre - shutdown:g}s")
    return eff


def check_network_policy(where: str, docs, tpl: dict) -> None:
    """The admin port (unauthenticated /metrics, purge, webhook) must not be open to every peer."""
    plabels = tpl["metadata"].get("labels", {})
    pols = [d for d in docs if d["kind"] == "NetworkPolicy"
            and labels_match(d["spec"]["podSelector"], plabels)
            and "Ingress" in (d["spec"].get("policyTypes") or ["Ingress"])]
    if not pols:
        R.fail(where, "no NetworkPolicy selects the pods (the admin port would be open to every peer)")
        return
    ports = {}
    for c, _ in all_containers(tpl["spec"]):
        for p in c.get("ports", []) or []:
            ports[p.get("name")] = p["containerPort"]
    admin = ports.get("admin")
    for pol in pols:
        for rule in pol["spec"].get("ingress") or []:
            rports = rule.get("ports")
            covers_admin = not rports or any(
                (ports.get(p.get("port")) if isinstance(p.get("port"), str) else p.get("port")) in (admin, None)
                for p in rports)
            if covers_admin and not rule.get("from"):
                R.fail(where, f"NetworkPolicy/{pol['metadata']['name']} opens the admin port {admin} to every peer")
                return
            for peer in rule.get("from") or []:
                if covers_admin and peer.get("ipBlock", {}).get("cidr") in ("0.0.0.0/0", "::/0"):
                    R.fail(where, f"NetworkPolicy/{pol['metadata']['name']} opens the admin port to any address")
                    return
    R.ok(f"{where}: admin port {admin} limited by NetworkPolicy/{pols[0]['metadata']['name']}")


def readme_rotation_targets(deploy: pathlib.Path) -> tuple[set[str], set[str]]:
    """The Secret and ConfigMap names deploy/README.md's in-place update commands write."""
    text = " ".join((deploy / "README.md").read_text().split())
    secrets = set(re.findall(r"kubectl(?: -n \S+)? create secret generic ([a-z0-9.-]+)", text))
    cms = set(re.findall(r"kubectl(?: -n \S+)? create configmap ([a-z0-9.-]+)", text))
    return secrets, cms


def check_rotation_targets(ov: str, deploy: pathlib.Path, docs) -> None:
    """Hot reload only happens if the objects the README tells operators to rewrite are the ones
    the pods mount: a kustomize name hash (or a renamed volume) silently breaks rotation."""
    want_secrets, want_cms = readme_rotation_targets(deploy)
    if not want_secrets or not want_cms:
        R.fail(ov, f"deploy/README.md has no `kubectl create secret generic`/`create configmap` rotation "
               f"command to check (found secrets {sorted(want_secrets)}, configmaps {sorted(want_cms)})")
        return
    rendered = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for w, tpl in pod_templates(docs):
        spec = tpl["spec"]
        for c, _ in all_containers(spec):
            if c["name"] != PROXY_CONTAINER:
                continue
            where = f"{ov} {w['kind']}/{w['metadata']['name']}"
            mounted = {m["name"] for m in c.get("volumeMounts", []) or []}
            vols = [v for v in spec.get("volumes", []) or [] if v["name"] in mounted]
            got_secrets = {v["secret"]["secretName"] for v in vols if "secret" in v}
            got_cms = {v["configMap"]["name"] for v in vols if "configMap" in v}
            ok = True
            if got_secrets != want_secrets:
                R.fail(where, f"mounts Secret(s) {sorted(got_secrets)}, but deploy/README.md rotates "
                       f"{sorted(want_secrets)}: a rotation would never reach the pods")
                ok = False
            if got_cms != want_cms:
                R.fail(where, f"mounts ConfigMap(s) {sorted(got_cms)}, but deploy/README.md rewrites "
                       f"{sorted(want_cms)}: a config change would never reach the pods")
                ok = False
            for n in sorted(want_cms):
                if ("ConfigMap", n) not in rendered:
                    R.fail(where, f"the render has no ConfigMap/{n} (the name README's commands write)")
                    ok = False
            # The Secret is created out of band (a generated one would lose keys rotated in
            # place at the next `kubectl apply -k`): it must not be in the render, and the pod
            # must start without it.
            for n in sorted(want_secrets):
                if ("Secret", n) in rendered:
                    R.fail(where, f"the render has Secret/{n}: `kubectl apply -k` would delete keys "
                           "rotated in place (three-way merge); create it out of band instead")
                    ok = False
            for v in vols:
                if "secret" in v and not v["secret"].get("optional"):
                    R.fail(where, f"Secret volume {v['name']} must be optional: true (the Secret is "
                           "created out of band, possibly after the first rollout)")
                    ok = False
            if ok:
                R.ok(f"{where}: mounts exactly Secret {sorted(want_secrets)} and ConfigMap {sorted(want_cms)}, "
                     "the names deploy/README.md's rotation commands write")


CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding"}


def check_namespaces(ov: str, docs, want: str) -> None:
    """Every namespaced object lands in the namespace the workload runs in: a ConfigMap rendered
    into another namespace leaves the pod's configMapKeyRef and volumes dangling (the sidecar
    overlay pointed at a Deployment with metadata.namespace, without `namespace:` in the
    kustomization, renders exactly that)."""
    want_ns = want or None
    wrong = [f"{d['kind']}/{d['metadata']['name']} in {d['metadata'].get('namespace') or '(none)'}"
             for d in docs
             if d["kind"] not in CLUSTER_SCOPED and d["metadata"].get("namespace") != want_ns]
    if wrong:
        R.fail(ov, f"objects outside the namespace {want or '(none)'}: " + ", ".join(wrong))
    else:
        R.ok(f"{ov}: every namespaced object is in {want or 'no namespace (the one applied to)'}")


SETTING_LINE = re.compile(r"^(#\s*)?([a-z][a-z0-9_]*)\s*=\s*(.+?)\s*$")


def config_lines(text: str) -> dict[str, tuple[bool, str]]:
    """TOML setting lines of a config.toml, commented-out ones included: key -> (active, value)."""
    out = {}
    for line in text.splitlines():
        m = SETTING_LINE.match(line)
        if m and m.group(2).replace("_", "-") in FLAGS:
            out[m.group(2)] = (m.group(1) is None, m.group(3))
    return out


# Keys an overlay's full copy of base/config.toml must carry exactly as base does: what it has
# to do with files and secrets, not with incidents.
KEEP_AS_BASE = ("_file", "reload_interval", "listen", "admin_listen", "token_header", "log_format")


def check_config_keeps_base(ov: str, deploy: pathlib.Path, docs) -> None:
    """load-shedding replaces base's config.toml with a full copy (TOML has no include): every
    setting base has, active or commented out, must be in the copy in the same state, and the
    secret file lines, reload_interval, listeners and log format identical, or switching
    profiles silently turns off the purge API, the webhook or hot reload."""
    base = config_lines((deploy / "kubernetes/base/config.toml").read_text())
    cm = next((d for d in docs if d["kind"] == "ConfigMap"
               and d["metadata"]["name"] == "chatwoot-cache-config"), None)
    if cm is None or "config.toml" not in (cm.get("data") or {}):
        R.fail(ov, "no ConfigMap chatwoot-cache-config with config.toml in the render")
        return
    got = config_lines(cm["data"]["config.toml"])
    before = R.failures
    for key, (active, value) in base.items():
        if key not in got:
            R.fail(ov, f"config.toml lacks {key} (base/config.toml has "
                   f"`{'' if active else '# '}{key} = {value}`)")
        elif got[key][0] != active:
            R.fail(ov, f"config.toml has {key} {'commented out' if active else 'active'}, "
                   f"base/config.toml {'active' if active else 'commented out'}")
        elif any(key.endswith(k) or key == k for k in KEEP_AS_BASE) and got[key][1] != value:
            R.fail(ov, f"config.toml sets {key} = {got[key][1]}, base/config.toml {value}: keep it as base")
    if R.failures == before:
        R.ok(f"{ov}: config.toml has all {len(base)} settings of base/config.toml in the same state "
             "(secret files, reload_interval, listeners identical)")


def check_manifests(args) -> None:
    deploy = pathlib.Path(args.deploy)
    allow = load_allowlist(deploy)
    ov = args.overlay
    docs = [d for d in yaml.safe_load_all(pathlib.Path(args.rendered).read_text()) if d]
    print(f"overlay {ov}: {len(docs)} objects: " + ", ".join(f"{d['kind']}/{d['metadata']['name']}" for d in docs))

    # 1. schemas
    before = R.failures
    n_schema = 0
    for d in docs:
        where = f"{ov} {d['kind']}/{d['metadata']['name']}"
        if (d["apiVersion"], d["kind"]) in CRD_KINDS:
            crd_check(where, d)
        else:
            schema_check(where, d, args.kube_version)
            n_schema += 1
    if R.failures == before:
        R.ok(f"{ov}: {n_schema} objects schema-valid (strict) against Kubernetes {', '.join(args.kube_version)}; "
         f"{len(docs) - n_schema} Prometheus Operator objects checked structurally")

    # 2. every container has an image (a strategic-merge patch naming a container that the
    #    workload does not have renders one without an image, which only the API server rejects)
    for w, tpl in pod_templates(docs):
        for c, _ in all_containers(tpl["spec"]):
            if not c.get("image"):
                R.fail(f"{ov} {w['kind']}/{w['metadata']['name']}", f"container {c['name']!r} has no image")

    # 3. the proxy containers
    effs = []
    gateway_workloads = []
    for w, tpl in pod_templates(docs):
        for c, is_init in all_containers(tpl["spec"]):
            if c["name"] != PROXY_CONTAINER:
                continue
            where = f"{ov} {w['kind']}/{w['metadata']['name']}"
            effs.append(check_proxy_container(where, docs, w, tpl["spec"], c, is_init))
            if not is_init:
                gateway_workloads.append((w, tpl))
    if not effs:
        R.fail(ov, "no chatwoot-cache container in the render")
    check_rotation_targets(ov, deploy, docs)
    check_namespaces(ov, docs, args.namespace)
    if args.keeps_base_config:
        check_config_keeps_base(ov, deploy, docs)

    # 4. gateway shape: Service, HPA, PDB, spread, service links, NetworkPolicy
    services = [d for d in docs if d["kind"] == "Service"]
    for w, tpl in gateway_workloads:
        where = f"{ov} {w['kind']}/{w['metadata']['name']}"
        plabels = tpl["metadata"].get("labels", {})
        spec = tpl["spec"]
        if not labels_match(w["spec"]["selector"], plabels):
            R.fail(where, "selector does not match the pod template labels")
        if spec.get("enableServiceLinks") is not False:
            R.fail(where, "enableServiceLinks must be false (service env vars share the CHATWOOT_CACHE_ prefix)")
        keys = {t["topologyKey"] for t in spec.get("topologySpreadConstraints", [])}
        if not {"topology.kubernetes.io/zone", "kubernetes.io/hostname"} <= keys:
            R.fail(where, f"topologySpreadConstraints should cover zone and hostname, has {sorted(keys)}")
        if "replicas" in w["spec"] and any(d["kind"] == "HorizontalPodAutoscaler" for d in docs):
            R.fail(where, "spec.replicas set while an HPA owns the replica count")
        if not any(s["spec"].get("selector") and labels_match({"matchLabels": s["spec"]["selector"]}, plabels) for s in services):
            R.fail(where, "no Service selects these pods")
        hpas = [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"
                and d["spec"]["scaleTargetRef"]["name"] == w["metadata"]["name"]
                and d["spec"]["scaleTargetRef"]["kind"] == w["kind"]]
        if len(hpas) != 1:
            R.fail(where, f"expected one HPA targeting it, found {len(hpas)}")
        else:
            h = hpas[0]["spec"]
            if h.get("minReplicas", 1) > h["maxReplicas"] or h.get("minReplicas", 1) < 2:
                R.fail(where, "HPA needs 2 <= minReplicas <= maxReplicas")
            if not any(m.get("resource", {}).get("name") == "cpu" for m in h.get("metrics", [])):
                R.fail(where, "HPA has no CPU metric")
            R.ok(f"{where}: HPA {h.get('minReplicas')}..{h['maxReplicas']} replicas on CPU")
        pdbs = [d for d in docs if d["kind"] == "PodDisruptionBudget" and labels_match(d["spec"]["selector"], plabels)]
        if len(pdbs) != 1:
            R.fail(where, f"expected one PodDisruptionBudget selecting the pods, found {len(pdbs)}")
        check_network_policy(where, docs, tpl)

    # 4. Services: selectors and named target ports resolve
    all_pods = [(w, tpl) for w, tpl in pod_templates(docs)]
    for s in services:
        where = f"{ov} Service/{s['metadata']['name']}"
        sel = s["spec"].get("selector") or {}
        pods = [(w, t) for w, t in all_pods if labels_match({"matchLabels": sel}, t["metadata"].get("labels", {}))]
        if not pods:
            R.fail(where, "selects no pod template")
            continue
        names = {p.get("name") for _, t in pods for c, _ in all_containers(t["spec"]) for p in c.get("ports", []) or []}
        for p in s["spec"]["ports"]:
            if isinstance(p.get("targetPort"), str) and p["targetPort"] not in names:
                R.fail(where, f"targetPort {p['targetPort']} is not a container port name")

    # 5. monitors
    for m in (d for d in docs if d["kind"] == "ServiceMonitor"):
        where = f"{ov} ServiceMonitor/{m['metadata']['name']}"
        matched = [s for s in services if labels_match(m["spec"]["selector"], s["metadata"].get("labels", {}))]
        if not matched:
            R.fail(where, "selects no Service in the render")
        for ep in m["spec"]["endpoints"]:
            if not any(ep.get("port") in {p.get("name") for p in s["spec"]["ports"]} for s in matched):
                R.fail(where, f"port {ep.get('port')} is not a port name of the selected Service")
    for m in (d for d in docs if d["kind"] == "PodMonitor"):
        where = f"{ov} PodMonitor/{m['metadata']['name']}"
        pods = [(w, t) for w, t in all_pods if labels_match(m["spec"]["selector"], t["metadata"].get("labels", {}))]
        if not pods:
            R.fail(where, "selects no pod template in the render")
        names = {p.get("name") for _, t in pods for c, _ in all_containers(t["spec"]) for p in c.get("ports", []) or []}
        for ep in m["spec"]["podMetricsEndpoints"]:
            if ep.get("port") not in names:
                R.fail(where, f"port {ep.get('port')} is not a container port name of the selected pods")

    # 6. monitoring is optional: all of it or none of it
    monitoring = [d for d in docs if (d["apiVersion"], d["kind"]) in CRD_KINDS]
    dashboards = [d for d in docs if d["kind"] == "ConfigMap" and (d["metadata"].get("labels") or {}).get("grafana_dashboard")]
    if args.monitoring == "off":
        if monitoring or dashboards:
            R.fail(ov, "monitoring components removed, yet the render still has "
                   + ", ".join(f"{d['kind']}/{d['metadata']['name']}" for d in monitoring + dashboards))
        else:
            R.ok(f"{ov}: renders without the monitoring components (no Prometheus Operator object, no dashboard)")
        return
    if not any(d["kind"] in ("ServiceMonitor", "PodMonitor") for d in monitoring) or not dashboards:
        R.fail(ov, "monitoring on, but no ServiceMonitor/PodMonitor or no dashboard ConfigMap in the render")

    # 7. rules: PromQL allowlist, capacity constant, rules file for promtool
    rules = [d for d in docs if d["kind"] == "PrometheusRule"]
    if len(rules) != 1:
        R.fail(ov, f"expected one PrometheusRule, found {len(rules)}")
        return
    spec = rules[0]["spec"]
    used = set()
    before = R.failures
    for g in spec["groups"]:
        for r in g["rules"]:
            used |= check_promql(f"{ov} rule {r.get('alert') or r.get('record')}", r["expr"], allow)
    if R.failures == before:
        R.ok(f"{ov}: rule expressions use only allowlisted metrics ({len(used)} of {len(allow)})")
    caps = {parse_size(str(e.get("cache-max-bytes"))) for e in effs if e}
    for g in spec["groups"]:
        for r in g["rules"]:
            if r.get("alert") == "ChatwootCacheNearCapacity":
                m = re.search(r"chatwoot_cache_stored_bytes(?:\{[^}]*\})?\)\s*/\s*(\d+)", r["expr"])
                if not m:
                    R.fail(ov, "cannot find the capacity constant in ChatwootCacheNearCapacity")
                elif {int(m.group(1))} != caps:
                    R.fail(ov, f"ChatwootCacheNearCapacity compares against {m.group(1)} bytes, "
                           f"but cache_max_bytes is {sorted(caps)}: patch the rule in the overlay")
                else:
                    R.ok(f"{ov}: capacity alert constant {m.group(1)} = cache_max_bytes")
    pathlib.Path(args.rules_out).write_text(yaml.safe_dump({"groups": spec["groups"]}, sort_keys=False))
    if args.test_rules_out:
        # Unit tests compare annotations exactly: keep only the (short) summary.
        groups = copy.deepcopy(spec["groups"])
        for g in groups:
            for r in g["rules"]:
                if "annotations" in r:
                    r["annotations"] = {"summary": r["annotations"]["summary"]}
        pathlib.Path(args.test_rules_out).write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))


# ---------------------------------------------------------------------------
# Grafana dashboard
# ---------------------------------------------------------------------------

def check_dashboard(args) -> None:
    deploy = pathlib.Path(args.deploy)
    allow = load_allowlist(deploy)
    path = pathlib.Path(args.file)
    try:
        dash = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        R.fail(str(path.name), f"not JSON: {e}")
        return
    where = path.name
    for k in ("uid", "title", "panels", "templating", "schemaVersion"):
        if k not in dash:
            R.fail(where, f"missing {k}")
    if not any(i.get("name") == "DS_PROMETHEUS" and i.get("type") == "datasource" for i in dash.get("__inputs", [])):
        R.fail(where, "no DS_PROMETHEUS datasource input (__inputs)")
    tvars = {v["name"]: v for v in dash.get("templating", {}).get("list", [])}
    if tvars.get("DS_PROMETHEUS", {}).get("type") != "datasource":
        R.fail(where, "no DS_PROMETHEUS datasource template variable (needed when provisioned from a ConfigMap)")
    used: set[str] = set()
    exprs = 0
    for name, v in tvars.items():
        if v.get("type") == "query":
            q = v["query"]["query"] if isinstance(v.get("query"), dict) else v.get("query", "")
            used |= check_promql(f"{where} variable {name}", q, allow)
            exprs += 1
    ids, cells = set(), {}
    for p in dash.get("panels", []):
        pw = f"{where} panel {p.get('id')} {p.get('title')!r}"
        if p.get("id") in ids:
            R.fail(pw, "duplicate panel id")
        ids.add(p.get("id"))
        gp = p.get("gridPos", {})
        if gp.get("x", 0) + gp.get("w", 0) > 24:
            R.fail(pw, "wider than the 24-column grid")
        for yy in range(gp.get("y", 0), gp.get("y", 0) + gp.get("h", 0)):
            for xx in range(gp.get("x", 0), gp.get("x", 0) + gp.get("w", 0)):
                if (xx, yy) in cells:
                    R.fail(pw, f"overlaps panel {cells[(xx, yy)]}")
                    break
                cells[(xx, yy)] = p.get("id")
        if p.get("type") == "row":
            continue
        if (p.get("datasource") or {}).get("uid") != "${DS_PROMETHEUS}":
            R.fail(pw, "panel datasource must be ${DS_PROMETHEUS}")
        if not p.get("targets"):
            R.fail(pw, "no queries")
        for t in p.get("targets", []):
            if (t.get("datasource") or {}).get("uid") != "${DS_PROMETHEUS}":
                R.fail(pw, "target datasource must be ${DS_PROMETHEUS}")
            used |= check_promql(pw, t.get("expr", ""), allow)
            exprs += 1
    missing = allow - used
    if missing:
        R.fail(where, f"metrics not shown anywhere: {sorted(missing)}")
    if R.failures == 0:
        R.ok(f"{where}: valid JSON, {len(ids)} panels, {exprs} PromQL expressions, uses all {len(used)} metrics, only allowlisted names")


def check_test_series(args) -> None:
    deploy = pathlib.Path(args.deploy)
    allow = load_allowlist(deploy)
    doc = yaml.safe_load(pathlib.Path(args.file).read_text())
    n = 0
    before = R.failures
    for t in doc.get("tests", []):
        for s in t.get("input_series", []):
            check_promql(f"{pathlib.Path(args.file).name} series", s["series"], allow)
            n += 1
    if R.failures == before:
        R.ok(f"{pathlib.Path(args.file).name}: {n} input series use only allowlisted metrics and labels")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("manifests")
    m.add_argument("--deploy", required=True)
    m.add_argument("--overlay", required=True)
    m.add_argument("--rendered", required=True)
    m.add_argument("--rules-out", required=True)
    m.add_argument("--test-rules-out")
    m.add_argument("--kube-version", action="append", required=True)
    m.add_argument("--namespace", default="",
                   help="the namespace every namespaced object must be in ('' = none set)")
    m.add_argument("--keeps-base-config", action="store_true",
                   help="the overlay's config.toml must carry every setting of base/config.toml")
    m.add_argument("--monitoring", choices=("on", "off"), default="on",
                   help="off: the overlay was rendered without its monitoring components")
    d = sub.add_parser("dashboard")
    d.add_argument("--deploy", required=True)
    d.add_argument("file")
    t = sub.add_parser("test-series")
    t.add_argument("--deploy", required=True)
    t.add_argument("file")
    args = ap.parse_args()
    {"manifests": check_manifests, "dashboard": check_dashboard, "test-series": check_test_series}[args.cmd](args)
    return 1 if R.failures else 0


if __name__ == "__main__":
    sys.exit(main())

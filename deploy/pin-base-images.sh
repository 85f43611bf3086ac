#!/usr/bin/env bash
# Pins deploy/Dockerfile's base images by digest, or refreshes the pins:
#
#   bash deploy/pin-base-images.sh
#
# For each FROM line, resolves the tag's current digest in its registry and
# rewrites the line as FROM NAME:TAG@sha256:DIGEST
# (an existing @sha256: is replaced). Run it when you want the base images'
# security updates, review the diff, rebuild. Needs registry access and one of:
# docker with buildx (`docker buildx imagetools inspect`), crane or skopeo.
# The digest is the multi-platform index's, so the pin holds on amd64 and arm64.
set -euo pipefail

DOCKERFILE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/Dockerfile"

digest_of() {
    local ref="$1"
    if command -v docker >/dev/null 2>&1 && docker buildx version >/dev/null 2>&1; then
        docker buildx imagetools inspect "$ref" --format '{{json .Manifest}}' |
            python3 -c 'import json, sys; print(json.load(sys.stdin)["digest"])'
    elif command -v crane >/dev/null 2>&1; then
        crane digest "$ref"
    elif command -v skopeo >/dev/null 2>&1; then
        skopeo inspect --raw "docker://$ref" | sha256sum | awk '{print "sha256:" $1}'
    else
        echo "need docker buildx, crane or skopeo to resolve $ref" >&2
        return 1
    fi
}

# FROM lines with an image reference (not a build stage's name).
grep -nE '^FROM [^$ ]+[:@]' "$DOCKERFILE" | while IFS= read -r line; do
    lineno="${line%%:*}"
    from="${line#*:FROM }"
    current="${from%% *}"
    rest="${from#"$current"}"
    ref="${current%@*}"
    digest="$(digest_of "$ref")"
    case "$digest" in
        sha256:????????????????????????????????????????????????????????????????) ;;
        *) echo "unexpected digest for $ref: $digest" >&2; exit 1 ;;
    esac
    sed -i "${lineno}s|.*|FROM $ref@$digest$rest|" "$DOCKERFILE"
    if [ "$current" = "$ref@$digest" ]; then
        echo "$ref@$digest (unchanged)"
    else
        echo "$current -> $ref@$digest"
    fi
done

#!/usr/bin/env bash
# Pins deploy/Dockerfile's base images by digest: resolves each `ARG *_IMAGE=name:tag` default to
# the digest its registry serves now and rewrites the line as `name:tag@sha256:<digest>`, so that
# later builds use exactly these images whatever the tag comes to point at. Run it where the
# registries (Docker Hub, NVIDIA's nvcr.io mirror on Docker Hub) are reachable, review the diff and
# commit it; run it again to move to newer images. With --check it changes nothing and exits 1 if
# any base image is not pinned.
# Needs one of: `docker buildx imagetools`, `crane` or `skopeo`.
set -euo pipefail
cd "$(dirname "$0")/.."
dockerfile=deploy/Dockerfile
mapfile -t lines < <(grep -E '^ARG [A-Z_]+_IMAGE=' "$dockerfile")
if [ "${1:-}" = --check ]; then
  unpinned=0
  for line in "${lines[@]}"; do
    if [[ "$line" != *@sha256:* ]]; then echo "not pinned: $line"; unpinned=1; fi
  done
  exit "$unpinned"
fi
digest() { # digest IMAGE: prints sha256:... for IMAGE
  if command -v crane >/dev/null; then crane digest "$1"
  elif command -v skopeo >/dev/null; then skopeo inspect --format '{{.Digest}}' "docker://$1"
  elif docker buildx version >/dev/null 2>&1; then
    docker buildx imagetools inspect "$1" --format '{{json .Manifest}}' | python3 -c 'import json, sys; print(json.load(sys.stdin)["digest"])'
  else
    echo "pin-base-images: needs crane, skopeo or docker buildx" >&2; return 1
  fi
}
for line in "${lines[@]}"; do
  name="${line#ARG }"; name="${name%%=*}"
  ref="${line#*=}"; ref="${ref%%@*}"
  d="$(digest "$ref")"
  [[ "$d" == sha256:* ]] || { echo "pin-base-images: no digest for $ref" >&2; exit 1; }
  sed -i "s|^ARG $name=.*|ARG $name=$ref@$d|" "$dockerfile"
  echo "$name=$ref@$d"
done

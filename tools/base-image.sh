#!/usr/bin/env bash
# Make a minimal Debian bookworm image with python3 from Debian's packages alone, for
# machines that reach no container registry (so `FROM python:3.11-slim` cannot be pulled).
#
#   tools/base-image.sh [IMAGE_NAME]        # default: fruitdask-base:bookworm
#
# Needs root, debootstrap and a Docker engine (DOCKER_HOST honoured). The image is built once:
# an existing image of that name is kept. Pass it to the build with
#   docker build --build-arg PYTHON_IMAGE=fruitdask-base:bookworm ...
set -euo pipefail
name="${1:-fruitdask-base:bookworm}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
if docker image inspect "$name" >/dev/null 2>&1; then
    echo "base image $name already present"
    exit 0
fi
command -v debootstrap >/dev/null || { echo "debootstrap is missing: apt-get install debootstrap" >&2; exit 1; }
root="$(mktemp -d /var/tmp/fruitdask-base.XXXXXX)"
trap 'rm -rf "$root"' EXIT
# minbase + the three packages the Dockerfile needs: python3 (3.11 on bookworm), its venv
# module, and the CA bundle for pip's TLS.
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$root" "$mirror" >"$root.log" 2>&1 || { tail -20 "$root.log" >&2; exit 1; }
rm -f "$root.log"
# Keep the image small: no apt lists or caches, no docs.
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
       "$root"/usr/share/doc/* "$root"/usr/share/man/*
tar -C "$root" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    - "$name" >/dev/null
echo "base image $name built from Debian bookworm ($mirror)"

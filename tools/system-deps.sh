#!/usr/bin/env bash
# System packages the test suite needs beyond Python, installed from Debian when missing:
#   chromium           the report's browser test (tests/test_report.py)
#   docker.io          dockerd + the docker client, for tests/test_containers.py
#   debootstrap        makes the container base image from Debian packages (tools/base-image.sh)
# Needs root and apt. When it cannot install something it says so and goes on: the tests
# that need it then fail with that reason (they are never skipped).
set -u
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v dockerd >/dev/null 2>&1 || missing+=(docker.io)
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
[ ${#missing[@]} -eq 0 ] && exit 0
echo "system-deps: installing ${missing[*]} (apt)"
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "WARNING: cannot install ${missing[*]} (needs root and apt): the tests that need them will fail" >&2
    exit 0
fi
{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >/tmp/fruitdask-system-deps.log 2>&1 \
    || { tail -20 /tmp/fruitdask-system-deps.log >&2; echo "WARNING: apt-get install ${missing[*]} failed: the tests that need them will fail" >&2; }
exit 0

#!/usr/bin/env bash
# The test command: installs redis-server/redis-tools when missing, then runs
# every unit and integration test (real redis-server with TLS on loopback).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo test --all-targets "$@"

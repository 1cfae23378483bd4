#!/usr/bin/env bash
# The differential test, longer: seeded random command sequences through the
# proxy and straight to a plain redis-server, compared reply by reply
# (tests/differential.rs). Environment: DIFF_SEEDS (default 200), DIFF_STEPS
# (default 300 writes per client), DIFF_CLIENTS (default 8 at once),
# DIFF_FIRST_SEED (default 1). Prints the commands sent and every sequence
# whose replies differ; exits non-zero if any does (differences the README
# documents are counted apart).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh >/dev/null
export DIFF_SEEDS="${DIFF_SEEDS:-200}"
export DIFF_STEPS="${DIFF_STEPS:-300}"
export DIFF_CLIENTS="${DIFF_CLIENTS:-8}"
exec cargo test --test differential the_proxy_answers_as_redis_does -- --nocapture

#!/usr/bin/env bash
# bench/unread.sh under several jemalloc settings in one run (issue 19: RSS
# after a burst). The binary's own settings (src/main.rs, malloc_conf) are
# overridden through _RJEM_MALLOC_CONF; "built in" runs without it. Appends
# a table to bench/MEMORY.md (OUT).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/MEMORY.md}"
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
confs=(
  "background_thread:false,dirty_decay_ms:10000,muzzy_decay_ms:0"
  "background_thread:true,dirty_decay_ms:10000,muzzy_decay_ms:0"
  "built in"
  "background_thread:true,dirty_decay_ms:0,muzzy_decay_ms:0"
)
rows=()
for conf in "${confs[@]}"; do
  : >"$tmp"
  if [ "$conf" = "built in" ]; then
    OUT="$tmp" bench/unread.sh >/dev/null
  else
    _RJEM_MALLOC_CONF="$conf" OUT="$tmp" bench/unread.sh >/dev/null
  fi
  row=$(grep '^| [0-9]' "$tmp" | tail -1)
  rows+=("| \`$conf\` $row")
done
{
  echo
  echo "## The same client under jemalloc settings, one run (bench/unread-allocator.sh)"
  echo
  echo "Release build, $(date -u +%Y-%m-%d). \"built in\" is src/main.rs's malloc_conf:"
  echo "\`background_thread:true,dirty_decay_ms:1000\`; the first row is jemalloc's default."
  echo
  echo "| jemalloc settings | proxy RSS before | highest while unread | peak (VmHWM) | 2 s after it left |"
  echo "|---|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
} >>"$OUT"
tail -10 "$OUT"

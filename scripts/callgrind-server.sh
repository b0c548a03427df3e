#!/usr/bin/env bash
# User-space instructions per request of the tollgate process (callgrind),
# for BENCHMARKS.md ("Server: decision API and proxy", instruction counts):
# POST /v1/check by account and by key, and the proxy (GET /x to bare_hyper),
# plus bare_hyper itself for the same requests. Not affected by other load
# on the machine, unlike timings. Loopback, bounded: ~1 min per binary.
#
# Needs: valgrind, wrk, curl, and a release build (see bench-server.sh).
# Usage: scripts/callgrind-server.sh [TARGET_DIR] [LABEL]
# Ports: PORT_BASE (default 18380) and +1 (tollgate), +10 (bare_hyper); give
# each concurrent run its own PORT_BASE.
set -u
PB=${PORT_BASE:-18380}
TG=$PB ADMIN=$((PB + 1)) UP=$((PB + 10))

BIN=${1:-${CARGO_TARGET_DIR:-target}}/release
L=${2:-tollgate}
W=$(mktemp -d /tmp/tg-callgrind.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null; rm -rf "$W"' EXIT

cp "$(dirname "$0")/bench-policy.toml" "$W/p.toml"
printf 'wrk.method = "POST"\nwrk.body = %s\nwrk.headers["Content-Type"] = "application/json"\n' \
  "'{\"account\":\"bench\",\"operation\":\"default\",\"cost\":0}'" >"$W/a.lua"

# Zero the counters after a warm-up, drive 8 s with wrk -c4, dump, divide.
measure() { # label, pid, lua-or-empty, url
  local label=$1 pid=$2 lua=$3 url=$4 n ir
  local args=(-t1 -c4); [ -n "$lua" ] && args+=(-s "$lua")
  wrk "${args[@]}" -d3s "$url" >/dev/null
  callgrind_control -z "$pid" >/dev/null
  n=$(wrk "${args[@]}" -d8s "$url" | awk '/requests in/ {print $1}')
  rm -f "$W"/cg."$pid"*
  callgrind_control -d "$pid" >/dev/null
  sleep 1
  ir=$(for f in "$W"/cg."$pid"*; do callgrind_annotate "$f" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",","",$1); print $1}'; done | awk '{s+=$1} END {print s}')
  echo "$label: $n requests, $ir instructions, $(awk -v i="$ir" -v n="$n" 'BEGIN{printf "%.0f", i/n}') instructions/request"
}

# bare_hyper itself.
TOKIO_WORKER_THREADS=1 valgrind --tool=callgrind --callgrind-out-file="$W/cg.%p" \
  "$BIN/examples/bare_hyper" 127.0.0.1:$UP 2>/dev/null & B=$!
sleep 3
measure "bare_hyper POST" $B "$W/a.lua" http://127.0.0.1:$UP/v1/check
measure "bare_hyper GET" $B "" http://127.0.0.1:$UP/x
kill $B; wait $B 2>/dev/null
"$BIN/examples/bare_hyper" 127.0.0.1:$UP 2>/dev/null & B=$!

for mode in check proxy; do
  if [ $mode = proxy ]; then cfg=(--config "$W/p.toml" --upstream http://127.0.0.1:$UP); plan=default
  else cfg=(); plan=pro; fi
  TOLLGATE_ADMIN_TOKEN=t TOKIO_WORKER_THREADS=1 valgrind --tool=callgrind --callgrind-out-file="$W/cg.%p" \
    "$BIN/tollgate" serve "${cfg[@]}" --listen 127.0.0.1:$TG --admin-listen 127.0.0.1:$ADMIN \
    --data-dir "$W/d-$mode" 2>/dev/null & T=$!
  for _ in $(seq 600); do curl -s -o /dev/null 127.0.0.1:$ADMIN/ && break; sleep 0.2; done
  curl -s -X POST 127.0.0.1:$ADMIN/admin/v1/accounts -H 'Authorization: Bearer t' \
    -H 'content-type: application/json' -d "{\"id\":\"bench\",\"plan\":\"$plan\"}" >/dev/null
  KEY=$(curl -s -X POST 127.0.0.1:$ADMIN/admin/v1/accounts/bench/keys -H 'Authorization: Bearer t' \
    | sed -E 's/.*"key":"([^"]+)".*/\1/')
  if [ $mode = proxy ]; then
    printf 'wrk.headers["x-api-key"] = "%s"\n' "$KEY" >"$W/p.lua"
    measure "$L proxy GET /x" $T "$W/p.lua" http://127.0.0.1:$TG/x
  else
    sed "s/\"account\":\"bench\"/\"key\":\"$KEY\"/" "$W/a.lua" >"$W/k.lua"
    measure "$L /v1/check by account" $T "$W/a.lua" http://127.0.0.1:$TG/v1/check
    measure "$L /v1/check by key" $T "$W/k.lua" http://127.0.0.1:$TG/v1/check
  fi
  kill $T; wait $T 2>/dev/null
done

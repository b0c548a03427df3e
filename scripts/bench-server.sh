#!/usr/bin/env bash
# Side-by-side server benchmarks of BENCHMARKS.md ("Server: decision API and
# proxy"): POST /v1/check vs a bare hyper server, and the proxy vs nginx
# limit_req in front of the same upstream. Loopback only, bounded in time.
#
# Needs: wrk, nginx (Debian: apt-get install -y wrk nginx-light), curl, and a
# release build:
#   cargo build --release -p tollgate --bin tollgate
#   cargo build --release -p tollgate-server --example bare_hyper
#
# Usage: scripts/bench-server.sh [TARGET_DIR] [DURATION]   (default: target, 10s)
# Servers run on core 0, wrk on core 1 (taskset).
# PORT_BASE (default 18180): ports PORT_BASE, +1 (tollgate), +10 (upstream),
# +50 (nginx): all within PORT_BASE..+99; give each concurrent run its own base.
#
# WORKERS (default 1): worker threads of every server, the same for all:
# bare_hyper gets TOKIO_WORKER_THREADS, tollgate --workers, nginx
# worker_processes. WORKERS=default sets none of them (tokio then starts one
# worker per CPU the process may use, which under `taskset -c 0` is also 1;
# nginx's Debian default is auto, again 1 core here).
#
# Besides wrk (closed loop), the decision API is driven at a fixed rate with
# `tollgate load --rate` (open loop, CONNECTIONS keep-alive connections,
# default 32) at half of what tollgate served by account in round 1 (or
# RATE=N per second), against bare hyper and tollgate by account and by key,
# two rounds: p50/p90/p99/p99.9/max from each call's due time (no
# coordinated omission), achieved rate and dropped ticks. The load tool runs
# on one core (core 1, one tokio worker); a run it (or the server) could not
# keep up with shows an achieved rate below the target and dropped ticks
# (BENCHMARKS.md, "loadgen").
#
# ONLY=check runs the decision API part alone (no proxy/nginx part);
# ONLY=proxy the proxy part alone.
#
# Keep PORT_BASE below Linux's ephemeral range (32768-60999, see
# /proc/sys/net/ipv4/ip_local_port_range): there, a client connection of an
# earlier part (in TIME_WAIT) can hold a port a later server must bind.
#
# PRIO=1 runs every server and load tool at `nice -n -20` (needs root), the
# same for all of them, so that other processes on the shared machine get
# little of their cores: the latency tail then shows the servers more than
# the machine's other work (a virtual machine's own preemption stays). With
# the kernel's autogroups on, nice only ranks processes of one session, so
# the script also sets its own session's autogroup to -20.
# SCHED_FIFO (chrt) was tried and is worse: the load tool yields in a loop
# near each due time, so the kernel's real-time throttling stops it for
# 50 ms every second and every p99 becomes ~45 ms.
set -euo pipefail

TARGET=${1:-${CARGO_TARGET_DIR:-target}}
DUR=${2:-10s}
BIN=$TARGET/release
WORK=$(mktemp -d /tmp/tg-bench.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

PB=${PORT_BASE:-18180}
TG=$PB ADMIN=$((PB + 1)) UP=$((PB + 10)) NGX=$((PB + 50))
WORKERS=${WORKERS:-1}
RUN=()
if [ "${PRIO:-0}" = 1 ]; then
  RUN=(nice -n -20)
  [ -w /proc/$$/autogroup ] && echo -20 >/proc/$$/autogroup
fi
if [ "$WORKERS" = default ]; then
  TG_WORKERS=() NGX_WORKERS=auto
else
  export TOKIO_WORKER_THREADS=$WORKERS
  TG_WORKERS=() NGX_WORKERS=$WORKERS
  # --workers where the build has it (older builds honour the variable).
  if "$BIN/tollgate" serve --help 2>/dev/null | grep -- --workers >/dev/null; then TG_WORKERS=(--workers "$WORKERS"); fi
fi
wait_port() { for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$1/" && return 0; sleep 0.1; done; echo "port $1 not up" >&2; exit 1; }
cpu_ticks() { # summed over the pids in $1 (space-separated)
  local p s=0
  for p in $1; do s=$((s + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done
  echo "$s"
}
run_wrk() { # label, server pid(s) (their CPU time is measured), wrk args...
  local label=$1 pid=$2; shift 2
  echo "### $label"
  local t0 t1 out reqs
  t0=$(cpu_ticks "$pid")
  out=$("${RUN[@]}" taskset -c 1 wrk -t1 "$@")
  t1=$(cpu_ticks "$pid")
  echo "$out" | grep -E "Requests/sec|^ +(50|90|99)%" || true
  reqs=$(echo "$out" | awk '/requests in/ {print $1}')
  LAST_RPS=$(echo "$out" | awk '/Requests\/sec/ {printf "%d", $2}')
  # Server CPU (user + system) per request, microseconds: robust to other
  # load on the machine, unlike requests/s.
  awk -v t="$((t1 - t0))" -v n="$reqs" -v hz="$(getconf CLK_TCK)" \
    'BEGIN { if (n > 0) printf "    server CPU per request: %.2f us (%d requests)\n", t / hz * 1e6 / n, n }'
}
CONN_ARGS=()  # --connections where the build has it (older builds drive reqwest)
if "$BIN/tollgate" load --help 2>/dev/null | grep -- --connections >/dev/null; then CONN_ARGS=(--connections "${CONNECTIONS:-32}"); fi
run_rate() { # label, server pid, rate, body file, URL: open loop with tollgate load
  local label=$1 pid=$2 rate=$3 body=$4 url=$5
  echo "### $label, fixed rate $rate/s"
  local out
  out=$(TOKIO_WORKER_THREADS=1 "${RUN[@]}" taskset -c 1 "$BIN/tollgate" load "$url" --rate "$rate" --duration 10s \
    "${CONN_ARGS[@]}" -X POST -H 'content-type: application/json' --body "$body" --json | tail -1)
  echo "$out" | sed -E 's/.*"latency_ms":\{([^}]*)\}.*"requests_per_s":([0-9.]+).*/    latency ms \1; achieved \2\/s/'
  echo "$out" | sed -E 's/.*"counts":\{([^}]*)\}.*"dropped":([0-9]+).*/    statuses \1; dropped ticks \2/'
  # Builds since loadgen2: every due call is answered, an error, dropped or unfinished.
  echo "$out" | sed -nE 's/.*"errors":([0-9]+).*"scheduled":([0-9]+).*"unfinished":([0-9]+).*/    scheduled \2, transport errors \1, unfinished \3/p'
}

cat >"$WORK/check.lua" <<'EOF'
wrk.method = "POST"
wrk.body   = '{"account":"bench","operation":"default","cost":0}'
wrk.headers["Content-Type"] = "application/json"
EOF

printf '%s' '{"account":"bench","operation":"default","cost":0}' >"$WORK/check.json"

cp "$(dirname "$0")/bench-policy.toml" "$WORK/policy.toml"

mkdir -p "$WORK/nginx/logs"
cat >"$WORK/nginx/nginx.conf" <<EOF
worker_processes $NGX_WORKERS;
error_log $WORK/nginx/logs/error.log warn;
pid $WORK/nginx/nginx.pid;
events { worker_connections 1024; }
http {
    access_log off;
    client_body_temp_path $WORK/nginx/body;
    proxy_temp_path $WORK/nginx/proxy;
    limit_req_zone \$http_x_api_key zone=bench:10m rate=100000000r/s;
    upstream up { server 127.0.0.1:$UP; keepalive 64; }
    server {
        listen 127.0.0.1:$NGX;
        location / {
            limit_req zone=bench burst=1000000 nodelay;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_pass http://up;
        }
    }
}
EOF

"${RUN[@]}" taskset -c 0 "$BIN/examples/bare_hyper" 127.0.0.1:$UP 2>/dev/null & BARE=$!; PIDS+=($BARE)
wait_port $UP

# Part 1: decision API on the built-in policy.
if [ "${ONLY:-}" != proxy ]; then
TOLLGATE_ADMIN_TOKEN=t "${RUN[@]}" taskset -c 0 "$BIN/tollgate" serve "${TG_WORKERS[@]}" --listen 127.0.0.1:$TG \
  --admin-listen 127.0.0.1:$ADMIN --data-dir "$WORK/data1" 2>"$WORK/tg1.log" & TG1=$!; PIDS+=($TG1)
wait_port $ADMIN
curl -s -X POST 127.0.0.1:$ADMIN/admin/v1/accounts -H 'Authorization: Bearer t' \
  -H 'content-type: application/json' -d '{"id":"bench","plan":"pro"}' >/dev/null
KEY=$(curl -s -X POST 127.0.0.1:$ADMIN/admin/v1/accounts/bench/keys -H 'Authorization: Bearer t' \
  | sed -E 's/.*"key":"([^"]+)".*/\1/')
sed "s/\"account\":\"bench\"/\"key\":\"$KEY\"/" "$WORK/check.lua" >"$WORK/checkkey.lua"
sed "s/\"account\":\"bench\"/\"key\":\"$KEY\"/" "$WORK/check.json" >"$WORK/checkkey.json"

echo "## worker threads: bare_hyper $(grep -c . <(cat /proc/$BARE/task/*/comm | grep tokio-rt)), tollgate $(grep -c . <(cat /proc/$TG1/task/*/comm | grep tokio-rt)) (WORKERS=$WORKERS)"
HALF=0
for round in 1 2; do
  echo "## decision API, round $round"
  run_wrk "bare hyper -c32" $BARE -c32 -d"$DUR" --latency -s "$WORK/check.lua" http://127.0.0.1:$UP/v1/check
  run_wrk "tollgate by account -c32" $TG1 -c32 -d"$DUR" --latency -s "$WORK/check.lua" http://127.0.0.1:$TG/v1/check
  [ "$round" = 1 ] && HALF=$((LAST_RPS / 2))
  run_wrk "tollgate by key -c32" $TG1 -c32 -d"$DUR" --latency -s "$WORK/checkkey.lua" http://127.0.0.1:$TG/v1/check
done
HALF=${RATE:-$HALF}
for round in 1 2; do
  echo "## decision API at a fixed rate, round $round (open loop; half of tollgate's round-1 throughput unless RATE is set)"
  run_rate "bare hyper" $BARE $HALF "$WORK/check.json" http://127.0.0.1:$UP/v1/check
  run_rate "tollgate by account" $TG1 $HALF "$WORK/check.json" http://127.0.0.1:$TG/v1/check
  run_rate "tollgate by key" $TG1 $HALF "$WORK/checkkey.json" http://127.0.0.1:$TG/v1/check
done
echo "## decision API, low load"
run_wrk "bare hyper -c4" $BARE -c4 -d5s --latency -s "$WORK/check.lua" http://127.0.0.1:$UP/v1/check
run_wrk "tollgate by account -c1" $TG1 -c1 -d5s --latency -s "$WORK/check.lua" http://127.0.0.1:$TG/v1/check
run_wrk "tollgate by account -c4" $TG1 -c4 -d5s --latency -s "$WORK/check.lua" http://127.0.0.1:$TG/v1/check
run_wrk "tollgate by key -c4" $TG1 -c4 -d5s --latency -s "$WORK/checkkey.lua" http://127.0.0.1:$TG/v1/check
kill $TG1; wait $TG1 2>/dev/null || true
fi
[ "${ONLY:-}" = check ] && exit 0

# Part 2: proxy vs nginx limit_req, same upstream.
TOLLGATE_ADMIN_TOKEN=t "${RUN[@]}" taskset -c 0 "$BIN/tollgate" serve "${TG_WORKERS[@]}" --config "$WORK/policy.toml" \
  --upstream http://127.0.0.1:$UP --listen 127.0.0.1:$TG --admin-listen 127.0.0.1:$ADMIN \
  --data-dir "$WORK/data2" 2>"$WORK/tg2.log" & TG2=$!; PIDS+=($TG2)
wait_port $ADMIN
curl -s -X POST 127.0.0.1:$ADMIN/admin/v1/accounts -H 'Authorization: Bearer t' \
  -H 'content-type: application/json' -d '{"id":"bench","plan":"default"}' >/dev/null
KEY=$(curl -s -X POST 127.0.0.1:$ADMIN/admin/v1/accounts/bench/keys -H 'Authorization: Bearer t' \
  | sed -E 's/.*"key":"([^"]+)".*/\1/')
"${RUN[@]}" taskset -c 0 nginx -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" -g 'daemon off;' & NGM=$!; PIDS+=($NGM)
wait_port $NGX
NGW=$(pgrep -P $NGM | tr '\n' ' ')   # every worker

for round in 1 2; do
  echo "## proxy, round $round"
  run_wrk "upstream alone -c32" $BARE -c32 -d"$DUR" --latency -H "x-api-key: $KEY" http://127.0.0.1:$UP/x
  run_wrk "nginx limit_req -c32" "$NGW" -c32 -d"$DUR" --latency -H "x-api-key: $KEY" http://127.0.0.1:$NGX/x
  run_wrk "tollgate proxy -c32" $TG2 -c32 -d"$DUR" --latency -H "x-api-key: $KEY" http://127.0.0.1:$TG/x
done
echo "## proxy, one connection"
run_wrk "upstream alone -c1" $BARE -c1 -d5s --latency -H "x-api-key: $KEY" http://127.0.0.1:$UP/x
run_wrk "nginx limit_req -c1" "$NGW" -c1 -d5s --latency -H "x-api-key: $KEY" http://127.0.0.1:$NGX/x
run_wrk "tollgate proxy -c1" $TG2 -c1 -d5s --latency -H "x-api-key: $KEY" http://127.0.0.1:$TG/x

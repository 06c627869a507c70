#!/usr/bin/env bash
# Where the built-in proxy's CPU goes, per request: user-space instructions (callgrind) and
# system calls (strace -c), counted over a fixed wrk load through `nonstop proxy` in front of
# one examples/hello instance. Instruction counts do not depend on how busy the machine is,
# so they are what to compare between two versions of the proxy. Called as
# `scripts/bench profile [OUT_DIR]`; loopback only, bounded in time (about a minute).
set -euo pipefail
cd "$(dirname "$0")/.."

out=${1:-target/proxy-profile}
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
  local port=$1 deadline=$((SECONDS + 60))
  until curl -fs -o /dev/null "http://127.0.0.1:$port/"; do
    ((SECONDS < deadline)) || { echo "nothing answers on $port" >&2; exit 1; }
    sleep 0.1
  done
}

# NONSTOP_BIN profiles another build (an earlier commit's, to compare) instead of this tree's.
nonstop=${NONSTOP_BIN:-target/release/nonstop}
# The bench profile with dev-dependencies, as `scripts/bench` builds it: the same binary, no
# second build of every dependency with other features.
[[ -n ${NONSTOP_BIN:-} ]] || cargo bench --no-run --locked --quiet --bench proof
cargo build --release --quiet --manifest-path examples/hello/Cargo.toml --target-dir target/hello-bench
hello=target/hello-bench/release/hello
nonstop_abs=$(realpath "$nonstop")

app=$(free_port)
NONSTOP_VERSION=profile "$hello" --port "$app" --profile real1 >/dev/null &
pids+=($!)
wait_port "$app"

listen=$(free_port)
cat >"$work/nonstop.toml" <<EOF
[server]
listen = "127.0.0.1:$(free_port)"
data_dir = "data"
proxy_socket = "proxy.sock"

[[app]]
name = "hello"
repo = "hello-repo"
build = "true"
artifact = "hello"
run = "{artifact} --port {port} --profile {profile}"
ports = [$app, $(free_port)]
switch = { kind = "proxy", listen = "127.0.0.1:$listen" }
EOF
# The proxy process starts on the live port it saved last time.
printf '{"hello": %s}\n' "$app" >"$work/proxy.state.json"

# One request's worth of work, whatever the run: warm up, zero the counters, load, dump.
load() { wrk -t1 -c"$1" -d"$2"s --timeout 20s "http://127.0.0.1:$listen/" | tee -a "$out/wrk.txt"; }
requests_in() { awk '/requests in/ {print $1}' <<<"$1"; }

: >"$out/wrk.txt"
rm -f "$out"/callgrind.out*
(
  cd "$work"
  RUST_LOG=warn exec valgrind -q --tool=callgrind --callgrind-out-file="$out/callgrind.out" \
    "$nonstop_abs" proxy --config nonstop.toml
) 2>"$out/valgrind.log" &
vpid=$!
pids+=("$vpid")
wait_port "$listen"
load 10 2 >/dev/null
callgrind_control -z "$vpid" >/dev/null
result=$(load 50 10)
callgrind_control -d "$vpid" >/dev/null
kill "$vpid"
wait "$vpid" 2>/dev/null || true
requests=$(requests_in "$result")
dump=$(ls -t "$out"/callgrind.out.* | sed -n 1p)
total=$(callgrind_annotate "$dump" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",","",$1); print $1}')
echo "user-space instructions per request: $((total / requests)) ($total over $requests requests)"
callgrind_annotate --inclusive=yes --threshold=100 "$dump" 2>/dev/null |
  awk -v n="$requests" '/^ *[0-9,]+ +\(/ {c=$1; gsub(",","",c); $1=""; printf "%9d %s\n", c/n, $0}' |
  sed -n 1,150p >"$out/inclusive.txt"
callgrind_annotate --threshold=100 "$dump" 2>/dev/null |
  awk -v n="$requests" '/^ *[0-9,]+ +\(/ {c=$1; gsub(",","",c); $1=""; printf "%9d %s\n", c/n, $0}' |
  sed -n 1,100p >"$out/self.txt"

# System calls per request: strace counts them (slowly, but the count is what matters).
(
  cd "$work"
  RUST_LOG=warn exec strace -f -c -o "$out/strace.txt" "$nonstop_abs" proxy --config nonstop.toml
) &
spid=$!
pids+=("$spid")
wait_port "$listen"
result=$(load 50 5)
kill -INT "$spid"
wait "$spid" 2>/dev/null || true
requests=$(requests_in "$result")
echo "system calls per request (strace -c, $requests requests):"
awk -v n="$requests" '$NF ~ /^[a-z_0-9]+$/ && $4 ~ /^[0-9]+$/ {printf "  %-16s %.2f\n", $NF, $4/n}' "$out/strace.txt" | sort -k2 -nr | sed -n 1,12p
echo "top inclusive (instructions per request) in $out/inclusive.txt, self in $out/self.txt"

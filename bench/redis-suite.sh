#!/usr/bin/env bash
# Redis' own test suite (`runtest` from Debian's `redis` source package, external-server mode)
# run directly against a redis-server and through the portal with `pooling.mode: multiplex`,
# the same units on both paths, each unit against a fresh server (and a fresh portal), in two
# modes: `db9`, runtest's default, where every client first SELECTs database 9 (through the
# portal that pins each client to a dedicated server connection), and `singledb`
# (`--singledb`: database 0, no SELECT), where the clients' commands share the portal's shared
# server connections, as most clients' do.
#   bench/redis-suite.sh                              # the default units, a debug build
#   UNITS="unit/protocol unit/multi" bench/redis-suite.sh
#   PORTAL_BIN=target/release/portal bench/redis-suite.sh
#   PATHS=multiplex MODES=singledb bench/redis-suite.sh   # only through the portal, db 0
# Needs: redis-server and tcl (runtest), dpkg-dev (dpkg-source), apt with deb-src reachable
# (this script adds Debian's deb-src entry when none is configured, as root), python3, curl,
# a Rust toolchain unless PORTAL_BIN is given.
# The suite is cached under $HOME/.cache/dbportal/redis-suite. Everything runs on loopback
# ports picked free, in a private temporary directory; only processes this script started are
# stopped, by PID. Each unit is bounded by UNIT_TIMEOUT seconds (a hang counts as a failure).
# Prints a Markdown table: path | mode | passed | failed | skipped, then every failed test.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

# The units that apply to a proxy in front of one server (no replication, no restarts, no
# server-side config files): every unit of the suite that runs tests against an external
# server; tests that need what external mode cannot give are excluded by tag below. (The other
# units are tagged external:skip whole, or need a cluster, TLS or sentinel.)
UNITS=${UNITS:-"unit/protocol unit/keyspace unit/info-command unit/quit unit/type/incr \
unit/type/string unit/type/list unit/type/hash unit/type/set unit/multi unit/pubsub \
unit/scripting unit/functions unit/tracking unit/expire unit/sort unit/dump unit/bitfield \
unit/bitops unit/geo unit/hyperloglog unit/introspection unit/introspection-2 unit/lazyfree \
unit/other unit/pause unit/querybuf unit/replybufsize unit/scan unit/slowlog unit/violations \
unit/type/list-2 unit/type/list-3 unit/type/stream unit/type/stream-cgroups unit/type/zset"}
# needs:save/reset/config-* (server
# restarts and CONFIG RESETSTAT of the whole server), needs:local-process (the server's own
# process). needs:debug stays: the server below enables DEBUG.
TAGS=${TAGS:-"-needs:save -needs:reset -needs:config-maxmemory -needs:config-resetstat -needs:local-process -needs:latency -needs:pfdebug"}
PATHS=${PATHS:-"direct multiplex"}
MODES=${MODES:-"db9 singledb"}
# Tests of what multiplexing documents it does not do (docs/configuration.md, "What
# multiplexing does not do"), skipped on both paths (some would stop their whole unit with an
# exception). One per line: the test's name, then why.
LIMITS=$(cat <<'EOF'
Script ACL check|ACL rules run as the probe's user (AUTH of a Redis ACL user is the portal's)
CLIENT KILL SKIPME YES/NO will kill all clients|the server counts and kills the portal's connections (INFO clients, CLIENT KILL), not its clients
CLIENT LIST with IDs|CLIENT LIST shows the server connection, whose id is the server's
CLIENT SETNAME can assign a name to this connection|CLIENT LIST shows the server connection, not the name the portal keeps
CLIENT SETNAME can change the name of an existing connection|CLIENT LIST shows the server connection, not the name the portal keeps
After CLIENT SETNAME, connection can still be closed|CLIENT LIST shows the server connection, not the name the portal keeps
MONITOR supports redacting command arguments|AUTH and HELLO are answered by the portal: MONITOR never sees them
MONITOR correctly handles multi-exec cases|MONITOR also shows the portal's own commands (CLIENT ID of a dedicated connection it opens)
query buffer resized correctly|CLIENT LIST shows the server connection's query buffer
query buffer resized correctly when not idle|CLIENT LIST shows the server connection's query buffer
verify reply buffer limits|CLIENT LIST shows the server connection's reply buffer
SLOWLOG - logged entry sanity check|SLOWLOG shows the server connection's name and address
SLOWLOG - can clean older entries|SLOWLOG shows the server connection's name and address
SLOWLOG - Rewritten commands are logged as their original command|SLOWLOG also logs the portal's own commands (the cleaning of a dedicated connection given back)
EOF
)
# Tests that cannot run against an external server at all, though not tagged so by the suite
# (they fail direct too), skipped on both paths.
EXTERNAL=$(cat <<'EOF'
SRANDMEMBER with a dict containing long chain|reads the server's PID (get_child_pid)
EOF
)
# Data-plane threads of the portal. 1 by default: runtest sends commands on several
# connections at once and relies on the server taking them in the order they were sent
# (e.g. two BRPOPLPUSH then an LPUSH, without waiting in between); a portal serving its
# clients on several threads may forward simultaneous commands of different connections in
# another order (see docs/configuration.md). PORTAL_THREADS=2 shows those tests.
PORTAL_THREADS=${PORTAL_THREADS:-1}
UNIT_TIMEOUT=${UNIT_TIMEOUT:-600}
CACHE=$HOME/.cache/dbportal/redis-suite

# --- the suite: `apt-get source redis`, once ------------------------------------------------
fetch_suite() {
  local src
  src=$(find "$CACHE" -maxdepth 2 -name runtest -printf '%h\n' 2>/dev/null | sort | tail -1)
  if [ -n "$src" ]; then echo "$src"; return; fi
  mkdir -p "$CACHE"
  if ! grep -rqsE '^(deb-src|Types:.*deb-src)' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    local sudo=
    [ "$(id -u)" = 0 ] || sudo=sudo
    echo "redis-suite: adding Debian's deb-src entry (/etc/apt/sources.list.d/dbportal-src.sources)" >&2
    local codename
    codename=$(. /etc/os-release && echo "$VERSION_CODENAME")
    printf 'Types: deb-src\nURIs: http://deb.debian.org/debian\nSuites: %s\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
      "$codename" | $sudo tee /etc/apt/sources.list.d/dbportal-src.sources >/dev/null
    $sudo apt-get update -qq >&2
  fi
  (cd "$CACHE" && timeout 300 apt-get source --download-only -qq redis >&2 2>/dev/null \
    || { [ "$(id -u)" = 0 ] || exit 1; apt-get update -qq >&2 && timeout 300 apt-get source --download-only -qq redis >&2; })
  local dsc
  dsc=$(ls "$CACHE"/redis_*.dsc | sort | tail -1)
  local dir=$CACHE/$(basename "$dsc" .dsc)
  (cd "$CACHE" && dpkg-source -x --no-check "$dsc" "$dir" >/dev/null)
  echo "$dir"
}
SUITE=$(fetch_suite)
server_version=$(redis-server --version | sed -n 's/.*v=\([0-9.]*\).*/\1/p')
suite_version=$(sed -n 's/.*REDIS_VERSION "\([0-9.]*\)".*/\1/p' "$SUITE/src/version.h")
if [ "${server_version%.*}" != "${suite_version%.*}" ]; then
  echo "redis-suite: redis-server $server_version is not the suite's $suite_version; results may differ" >&2
fi

if [ -z "${PORTAL_BIN:-}" ]; then
  export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
  cargo build -q -p dbportal-portal --bin portal
  # Under target/debug, or target/<triple>/debug when CARGO_BUILD_TARGET is set.
  PORTAL_BIN=$(ls -t "$CARGO_TARGET_DIR"/debug/portal "$CARGO_TARGET_DIR"/*/debug/portal 2>/dev/null | head -1 || true)
fi

work=$(mktemp -d /tmp/dbportal-redis-suite.XXXXXX)
pids=()
stop() { # pid...: only processes this script started
  for p in "$@"; do kill "$p" 2>/dev/null || true; done
  for p in "$@"; do
    for _ in $(seq 1 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null || true
  done
}
cleanup() {
  stop "${pids[@]}"
  [ -n "${KEEP:-}" ] && echo "redis-suite: kept $work" >&2 || rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { # port
  for _ in $(seq 1 100); do
    redis-cli -h 127.0.0.1 -p "$1" ping >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  return 1
}

# One unit on one path in one mode, against a fresh server (and portal); prints its result
# lines, each prefixed with the path and mode.
run_unit() { # path mode unit
  local path=$1 mode=$2 unit=$3 dir
  dir=$work/$path-$mode/${unit//\//_}
  mkdir -p "$dir"
  local rport
  rport=$(free_port)
  redis-server --port "$rport" --bind 127.0.0.1 --dir "$dir" --save "" --appendonly no \
    --enable-debug-command yes --daemonize no --logfile "$dir/redis.log" &
  local rpid=$!
  pids+=("$rpid")
  wait_port "$rport"
  local port=$rport ppid=
  if [ "$path" = multiplex ]; then
    port=$(free_port)
    cat >"$dir/portal.yaml" <<EOF
engine: redis
listen: 127.0.0.1:$port
admin: 127.0.0.1:$(free_port)
backends: [{name: redis, address: "127.0.0.1:$rport"}]
routing: {mode: first}
tls: {mode: disabled}
timeouts: {client: 1h, server: 1h, connect: 5s}
limits: {maxConnections: 2000, maxConnectionsPerClient: 0}
pooling: {mode: multiplex}
drainTimeout: 1s
EOF
    TOKIO_WORKER_THREADS=$PORTAL_THREADS RUST_LOG=${PORTAL_LOG:-warn} "$PORTAL_BIN" --config "$dir/portal.yaml" >"$dir/portal.log" 2>&1 &
    ppid=$!
    pids+=("$ppid")
    wait_port "$port"
  fi
  # runtest writes under tests/tmp: a private copy of the suite's tests per run.
  local copy=$dir/suite
  mkdir -p "$copy"
  cp -r "$SUITE/runtest" "$SUITE/tests" "$copy/"
  mkdir -p "$copy/src" && ln -sf "$(command -v redis-server)" "$copy/src/redis-server" \
    && ln -sf "$(command -v redis-cli)" "$copy/src/redis-cli"
  # runtest's own listener and servers: a port range of its own (it skips ports in use; a
  # port taken in between makes it stop at once, and it is tried again elsewhere).
  local rc=0 skips=()
  [ "$mode" = singledb ] && skips+=(--singledb)
  while IFS='|' read -r name _; do
    [ -n "$name" ] && skips+=(--skiptest "$name")
  done <<<"$LIMITS
$EXTERNAL"
  for _ in 1 2 3; do
    local base=$((20000 + RANDOM % 30000))
    rc=0
    (cd "$copy" && timeout -k 10 "$UNIT_TIMEOUT" ./runtest --host 127.0.0.1 --port "$port" \
      --single "$unit" --tags "$TAGS" --timeout "$UNIT_TIMEOUT" --baseport "$base" "${skips[@]}" \
      >"$dir/runtest.raw" 2>&1) || rc=$?
    grep -q "couldn't open socket: address already in use" "$dir/runtest.raw" || break
  done
  sed 's/\x1b\[[0-9;]*m//g' "$dir/runtest.raw" >"$dir/runtest.log"
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    echo "[err]: $unit did not finish within ${UNIT_TIMEOUT}s (hang)" >>"$dir/runtest.log"
  elif ! grep -q '^\[ok\]\|^\[err\]\|^\[exception\]\|All tests passed' "$dir/runtest.log"; then
    echo "[err]: $unit did not run (exit status $rc): $(head -3 "$dir/runtest.log" | tr '\n' ' ')" >>"$dir/runtest.log"
  fi
  local tag="$path $mode $unit"
  grep -E '^\[(ok|err|exception|skip)\]' "$dir/runtest.log" | sed "s#^#$tag #" || true
  if [ -n "$ppid" ]; then
    if ! kill -0 "$ppid" 2>/dev/null; then
      echo "$tag [err]: the portal exited (crash): $(tail -1 "$dir/portal.log")"
    fi
    stop "$ppid"
    grep -iE 'warn|error|panic' "$dir/portal.log" | grep -v 'new leader' | head -5 | sed "s#^#$tag [log] #" || true
  fi
  stop "$rpid"
}

results=$work/results
: >"$results"
for unit in $UNITS; do
  for mode in $MODES; do
    for path in $PATHS; do
      echo "redis-suite: $path $mode $unit" >&2
      run_unit "$path" "$mode" "$unit" >>"$results"
    done
  done
done

echo
echo "Redis $server_version, runtest from Debian's redis $suite_version ($(basename "$SUITE")), $(date -u +%Y-%m-%d)"
echo "units: $UNITS"
echo "tags: $TAGS; the portal on $PORTAL_THREADS data-plane thread(s)"
echo
echo "| path | mode | passed | failed | skipped |"
echo "|---|---|---|---|---|"
for mode in $MODES; do
  for path in $PATHS; do
    ok=$(grep -c "^$path $mode [^ ]* \[ok\]" "$results" || true)
    bad=$(grep -cE "^$path $mode [^ ]* \[(err|exception)\]" "$results" || true)
    skipped=$(grep -c "^$path $mode [^ ]* \[skip\]" "$results" || true)
    label=$path
    [ "$path" = multiplex ] && label='portal, `pooling.mode: multiplex`'
    mlabel='`db9` (SELECT 9: dedicated connections)'
    [ "$mode" = singledb ] && mlabel='`singledb` (db 0: shared connections)'
    echo "| $label | $mlabel | $ok | $bad | $skipped |"
  done
done
echo
echo "Skipped on both paths:"
while IFS='|' read -r name why; do
  [ -n "$name" ] && echo "- \"$name\": $why"
done <<<"$LIMITS
$EXTERNAL"
for mode in $MODES; do
  for path in $PATHS; do
    if grep -qE "^$path $mode [^ ]* \[(err|exception)\]" "$results"; then
      echo
      echo "Failed, $path $mode:"
      grep -E "^$path $mode [^ ]* \[(err|exception)\]" "$results" | sed "s#^$path $mode #- #"
    fi
    if grep -q "^$path $mode [^ ]* \[log\]" "$results"; then
      echo
      echo "Portal log, $path $mode:"
      grep "^$path $mode [^ ]* \[log\]" "$results" | sed "s#^$path $mode #- #"
    fi
  done
done

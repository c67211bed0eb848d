#!/usr/bin/env bash
# PostgreSQL's own regression suite (`pg_regress`, the full parallel_schedule in installcheck
# mode, from Debian's `postgresql-15` source package) run directly against a server, through
# the portal with `pooling.mode: session` and `transaction`, and through PgBouncer in
# transaction mode: each path against a fresh server, pg_regress exactly as shipped (its own
# PGDATESTYLE, PGTZ and PGOPTIONS).
#   bench/pg-suite.sh                                  # every path, a debug build
#   PATHS="direct transaction" bench/pg-suite.sh
#   PORTAL_BIN=target/release/portal bench/pg-suite.sh
#   KEEP=1 bench/pg-suite.sh                           # keep each path's regression.diffs
# Needs: PostgreSQL 15 (postgresql-15), postgresql-server-dev-15 (pg_regress and the server
# headers, installed as root when missing), gcc, dpkg-dev (dpkg-source), apt with deb-src
# reachable (this script adds Debian's deb-src entry when none is configured, as root),
# pgbouncer for its path, python3, curl, a Rust toolchain unless PORTAL_BIN is given.
# The suite and its C test libraries are cached under $HOME/.cache/dbportal/pg-suite.
# Everything runs on loopback ports picked free, in a private temporary directory; only
# processes this script started are stopped, by PID. Each run is bounded by RUN_TIMEOUT.
# TCP clients authenticate with scram-sha-256 on every path: the portal and PgBouncer fetch
# the verifier with their auth query, as their docs recommend.
# Prints a Markdown table: path | passed | failed | failed beyond direct, then every failed
# test by path and the tests that fail through the portal but pass through PgBouncer.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD

PATHS=${PATHS:-"direct session transaction pgbouncer"}
CONCURRENT=${CONCURRENT:-20}
RUN_TIMEOUT=${RUN_TIMEOUT:-600}
PG_BIN=/usr/lib/postgresql/15/bin
PGXS=/usr/lib/postgresql/15/lib/pgxs
CACHE=$HOME/.cache/dbportal/pg-suite

# --- the suite: `apt-get source postgresql-15`, once; its C test libraries built ------------
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
fetch_suite() { # prints the suite's version
  # The suite of the installed server's version where Debian's source archive has it (its
  # expected outputs follow the server's and psql's point releases), else the newest it has.
  local version
  version=$(dpkg-query -W -f='${Version}' postgresql-15)
  local have
  have=$(ls -d "$CACHE"/*/lib/regress.so 2>/dev/null | sed "s#^$CACHE/##; s#/lib/regress.so##" | sort -V | tail -1)
  if [ -f "$CACHE/$version/lib/regress.so" ]; then echo "$version"; return; fi
  mkdir -p "$CACHE"
  if [ ! -x "$PGXS/src/test/regress/pg_regress" ]; then
    echo "pg-suite: installing postgresql-server-dev-15 (pg_regress, server headers)" >&2
    as_root apt-get install -y -qq --no-install-recommends postgresql-server-dev-15 >&2
  fi
  if ! grep -rqsE '^(deb-src|Types:.*deb-src)' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    echo "pg-suite: adding Debian's deb-src entry (/etc/apt/sources.list.d/dbportal-src.sources)" >&2
    local codename
    codename=$(. /etc/os-release && echo "$VERSION_CODENAME")
    printf 'Types: deb-src\nURIs: http://deb.debian.org/debian\nSuites: %s\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
      "$codename" | as_root tee /etc/apt/sources.list.d/dbportal-src.sources >/dev/null
    as_root apt-get update -qq >&2
  fi
  if ! (cd "$CACHE" && timeout 300 apt-get source --download-only -qq "postgresql-15=$version" >/dev/null 2>&1); then
    if [ -n "$have" ]; then echo "$have"; return; fi
    (cd "$CACHE" && timeout 300 apt-get source --download-only -qq postgresql-15 >&2 2>/dev/null)
    version=$(ls "$CACHE"/postgresql-15_*.dsc | sed 's#.*/postgresql-15_##; s#\.dsc$##' | sort -V | tail -1)
  fi
  rm -rf "${CACHE:?}/$version"
  (cd "$CACHE" && dpkg-source -q -x --no-check "postgresql-15_$version.dsc" "$version" >/dev/null)
  # regress.so (the suite's own C functions) and contrib/spi's autoinc and refint, which the
  # `triggers` test loads from the same directory.
  mkdir -p "$CACHE/$version/lib"
  local inc
  inc=$(pg_config --includedir-server)
  for c in src/test/regress/regress.c contrib/spi/autoinc.c contrib/spi/refint.c; do
    gcc -O1 -fPIC -shared -I"$inc" -o "$CACHE/$version/lib/$(basename "$c" .c).so" "$CACHE/$version/$c"
  done
  echo "$version"
}
suite_version=$(fetch_suite)
installed=$(dpkg-query -W -f='${Version}' postgresql-15)
if [ "$suite_version" != "$installed" ]; then
  echo "pg-suite: Debian's source archive has no postgresql-15 $installed; the suite is $suite_version's, so tests of what changed in between fail on every path, direct included" >&2
fi
SUITE=$CACHE/$suite_version/src/test/regress
LIB=$CACHE/$suite_version/lib
server_version=$("$PG_BIN/postgres" --version | awk '{print $3}')

if [ -z "${PORTAL_BIN:-}" ] && [[ " $PATHS " == *" session "* || " $PATHS " == *" transaction "* ]]; then
  export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
  cargo build -q -p dbportal-portal --bin portal
  PORTAL_BIN=$CARGO_TARGET_DIR/${CARGO_BUILD_TARGET:+$CARGO_BUILD_TARGET/}debug/portal
fi

work=$(mktemp -d /tmp/dbportal-pg-suite.XXXXXX)
# The server reads the suite's data files and loads its libraries, and writes into the output
# directory: a copy of them that the postgres user can read, under the private directory.
mkdir -p "$work/suite"
cp -r "$SUITE/sql" "$SUITE/expected" "$SUITE/data" "$SUITE/parallel_schedule" "$SUITE/resultmap" "$work/suite/" 2>/dev/null \
  || cp -r "$SUITE/sql" "$SUITE/expected" "$SUITE/data" "$SUITE/parallel_schedule" "$work/suite/"
cp -r "$LIB" "$work/lib"
SUITE=$work/suite
chown -R postgres:postgres "$work"
pids=()
stop() { # pid...: only processes this script started
  for p in "$@"; do kill "$p" 2>/dev/null || true; done
  for p in "$@"; do
    for _ in $(seq 1 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null || true
  done
}
source bench/stop-pg.sh   # stop_pg (the working directory is the repository)
cleanup() {
  for data in "$work"/*/data; do stop_pg "$data"; done
  stop "${pids[@]}"
  [ -n "${KEEP:-}" ] && echo "pg-suite: kept $work" >&2 || rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
as_pg() { runuser -u postgres -- "$@"; }
PW=regresspw
wait_pg() { # port
  for _ in $(seq 1 150); do
    PGPASSWORD=$PW "$PG_BIN/psql" -h 127.0.0.1 -p "$1" -U postgres -XAtqc 'select 1' postgres >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  return 1
}

# One path against a fresh server; prints "path test ok|FAILED" lines.
run_path() { # path
  local path=$1 dir=$work/$1
  mkdir -p "$dir" && chown postgres "$dir"
  echo "$PW" >"$dir/pw" && chown postgres "$dir/pw"
  as_pg "$PG_BIN/initdb" -D "$dir/data" -U postgres --auth-local=trust --auth-host=scram-sha-256 \
    --pwfile="$dir/pw" --no-sync >/dev/null
  local pgport
  pgport=$(free_port)
  : >"$dir/pg.log" && chown postgres "$dir/pg.log"
  as_pg "$PG_BIN/postgres" -D "$dir/data" -p "$pgport" -k "$dir" -c listen_addresses=127.0.0.1 \
    -c fsync=off -c max_connections=200 >"$dir/pg.log" 2>&1 &
  local pgpid=$!
  pids+=("$pgpid")
  wait_pg "$pgport"
  local port=$pgport proxy=
  case $path in
    session | transaction)
      port=$(free_port)
      local admin
      admin=$(free_port)
      cat >"$dir/portal.yaml" <<EOF
engine: postgres
listen: 127.0.0.1:$port
admin: 127.0.0.1:$admin
tls: {mode: disabled}
backends: [{name: pg, address: "127.0.0.1:$pgport"}]
healthCheck: {interval: 1s, credentials: {username: postgres, password: $PW}}
timeouts: {client: 1h, server: 1h}
limits: {maxConnections: 2000, maxConnectionsPerClient: 0, maxNegotiatingPerClient: 0, connectionRatePerClient: 0}
pooling: {mode: $path, auth: {query: ""}}
EOF
      RUST_LOG=${PORTAL_LOG:-warn} "$PORTAL_BIN" --config "$dir/portal.yaml" >"$dir/portal.log" 2>&1 &
      proxy=$!
      pids+=("$proxy")
      for _ in $(seq 1 100); do
        curl -sf "http://127.0.0.1:$admin/readyz" >/dev/null 2>&1 && break
        sleep 0.1
      done
      ;;
    pgbouncer)
      port=$(free_port)
      local verifier
      verifier=$(PGPASSWORD=$PW "$PG_BIN/psql" -h 127.0.0.1 -p "$pgport" -U postgres -XAtqc \
        "select passwd from pg_shadow where usename = 'postgres'" postgres)
      echo "\"postgres\" \"$verifier\"" >"$dir/userlist.txt"
      cat >"$dir/pgbouncer.ini" <<EOF
[databases]
* = host=127.0.0.1 port=$pgport
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $port
unix_socket_dir =
auth_type = scram-sha-256
auth_file = $dir/userlist.txt
auth_user = postgres
pool_mode = transaction
ignore_startup_parameters = options
max_client_conn = 2000
logfile = $dir/pgbouncer.log
EOF
      chown postgres "$dir/pgbouncer.ini" "$dir/userlist.txt"
      as_pg pgbouncer "$dir/pgbouncer.ini" >/dev/null 2>&1 &
      proxy=$!
      pids+=("$proxy")
      ;;
  esac
  wait_pg "$port" || echo "pg-suite: $path does not answer on port $port" >&2
  local out=$dir/out rc=0
  mkdir -p "$out" && chown postgres "$out"
  # pg_regress as the server's user: the files the server writes with COPY TO are read back.
  (cd "$dir" && timeout -k 10 "$RUN_TIMEOUT" runuser -u postgres -- env PGPASSWORD=$PW "$PGXS/src/test/regress/pg_regress" \
    --inputdir="$SUITE" --outputdir="$out" --bindir="$PG_BIN" --dlpath="$work/lib" \
    --schedule="$SUITE/parallel_schedule" --max-concurrent-tests="$CONCURRENT" \
    --host=127.0.0.1 --port="$port" --user=postgres >"$dir/pg_regress.log" 2>&1) || rc=$?
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    echo "$path (run) FAILED did not finish within ${RUN_TIMEOUT}s"
  fi
  # "test name ... ok 12 ms", "     name ... FAILED 30 ms", "     name ... failed (ignored)"
  sed -nE 's/^(test +| +)([A-Za-z0-9_-]+) +\.\.\. (ok|FAILED|failed \(ignored\)).*/\2 \3/p' \
    "$dir/pg_regress.log" | sed "s/failed (ignored)/FAILED/; s#^#$path #"
  # A test the run never reached (a hang, a crash) counts as failed.
  local t
  for t in $(sed -n 's/^test: *//p' "$SUITE/parallel_schedule"); do
    grep -qE "^(test +| +)$t +\.\.\. " "$dir/pg_regress.log" || echo "$path $t FAILED (not run)"
  done
  if ! grep -qE '\.\.\. (ok|FAILED)' "$dir/pg_regress.log"; then
    echo "$path (run) FAILED pg_regress did not run: $(head -3 "$dir/pg_regress.log" | tr '\n' ' ')"
  fi
  if [ -n "$proxy" ] && ! kill -0 "$proxy" 2>/dev/null; then
    echo "$path (proxy) FAILED the proxy exited: $(tail -1 "$dir/portal.log" "$dir/pgbouncer.log" 2>/dev/null | tr '\n' ' ')"
  fi
  [ -n "$proxy" ] && stop "$proxy"
  stop_pg "$dir/data"
  stop "$pgpid"
  if [ -n "${KEEP:-}" ] && [ -f "$out/regression.diffs" ]; then
    echo "pg-suite: $path diffs in $out/regression.diffs" >&2
  fi
}

results=$work/results
: >"$results"
for path in $PATHS; do
  echo "pg-suite: $path ($(date -u +%H:%M:%S))" >&2
  run_path "$path" >>"$results"
done

failed() { awk -v p="$1" '$1 == p && $3 == "FAILED" && $2 !~ /^\(/ {print $2}' "$results" | sort -u; }
passed() { awk -v p="$1" '$1 == p && $3 == "ok" {print $2}' "$results" | sort -u; }
echo
echo "PostgreSQL $server_version, pg_regress from Debian's postgresql-15 $suite_version (parallel_schedule, installcheck, --max-concurrent-tests=$CONCURRENT), $(date -u +%Y-%m-%d)"
echo "scram-sha-256 for TCP clients on every path; the portal and PgBouncer at their default pool sizes"
echo
echo "| path | passed | failed | failed beyond direct |"
echo "|---|---|---|---|"
for path in $PATHS; do
  ok=$(awk -v p="$path" '$1 == p && $3 == "ok"' "$results" | wc -l)
  bad=$(failed "$path" | wc -l)
  beyond=-
  [[ " $PATHS " == *" direct "* ]] && [ "$path" != direct ] \
    && beyond=$(comm -23 <(failed "$path") <(failed direct) | wc -l)
  case $path in
    session | transaction) label="portal, \`pooling.mode: $path\`" ;;
    pgbouncer) label="PgBouncer $(pgbouncer --version 2>/dev/null | awk 'NR==1{print $2}'), \`pool_mode = transaction\` (\`ignore_startup_parameters = options\`)" ;;
    *) label=$path ;;
  esac
  echo "| $label | $ok | $bad | $beyond |"
done
for path in $PATHS; do
  list=$(failed "$path" | tr '\n' ' ')
  [ -n "$list" ] && { echo; echo "Failed, $path: $list"; }
  notrun=$(awk -v p="$path" '$1 == p && $4 == "(not" {print $2}' "$results" | tr '\n' ' ')
  [ -n "$notrun" ] && echo "(not run, the run stopped or hung first: $notrun)"
  awk -v p="$path" '$1 == p && $2 ~ /^\(/ {$1 = ""; print "-" $0}' "$results"
done
if [[ " $PATHS " == *" pgbouncer "* ]]; then
  for path in session transaction; do
    [[ " $PATHS " == *" $path "* ]] || continue
    worse=$(comm -12 <(failed "$path") <(passed pgbouncer) | tr '\n' ' ')
    echo
    echo "Failed through the portal ($path) but passed through PgBouncer: ${worse:-none}"
  done
fi

#!/usr/bin/env bash
# PostgreSQL transaction pooling benchmark, in one run: direct (max_connections raised),
# PgBouncer (Debian's pgbouncer, pool_mode transaction, same pool size, same TLS certificate)
# and the portal (pooling.mode transaction): pgbench -S over TLS (or plaintext, WIRE), simple
# and prepared modes; TPS, p50/p99 latency, the proxy's CPU seconds per 1,000 transactions,
# backend connections used; then the RSS per idle client of the portal and of PgBouncer.
#   bench/pooling.sh                                # 1,000 clients, pool 20, 15 s per run
#   CLIENTS=200 SECONDS_PER_RUN=5 bench/pooling.sh  # quicker
#   IDLE="5000 10000" bench/pooling.sh              # idle-client memory at these counts
#   MODES= bench/pooling.sh                         # idle-client memory only
#   PORTAL_THREADS=1 bench/pooling.sh               # the portal on one event-loop thread, as
#                                                   # PgBouncer (default: one per core)
#   WIRE=plaintext bench/pooling.sh                 # clients without TLS, to PgBouncer and the
#                                                   # portal alike (default: TLS)
# Needs: postgresql-15, pgbench, pgbouncer, openssl, python3-psycopg, a Rust toolchain.
# Prints figures (Markdown); it is not a test. Run as root (PostgreSQL and PgBouncer run as
# the postgres user).
set -euo pipefail
cd "$(dirname "$0")/.."
ulimit -n "$(ulimit -Hn)"
CLIENTS=${CLIENTS:-1000}
POOL=${POOL:-20}
SECS=${SECONDS_PER_RUN:-15}
THREADS=${THREADS:-2}
IDLE=${IDLE:-"5000 10000"}
MODES=${MODES-"simple prepared"}
WIRE=${WIRE:-TLS}
case "$WIRE" in
  TLS) SSLMODE=require ;;
  plaintext) SSLMODE=disable ;;
  *) echo "WIRE must be TLS or plaintext, not $WIRE" >&2; exit 2 ;;
esac
PG_BIN=/usr/lib/postgresql/15/bin
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
cargo build --release -q -p dbportal-portal --bin portal
PORTAL_BIN=$CARGO_TARGET_DIR/${CARGO_BUILD_TARGET:+$CARGO_BUILD_TARGET/}release/portal

work=$(mktemp -d /tmp/dbportal-bench-pooling.XXXXXX)
chown postgres:postgres "$work"
pids=()
source bench/stop-pg.sh   # stop_pg (the working directory is the repository)
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  stop_pg "$work/data"
  sleep 1
  rm -rf "$work"
}
trap cleanup EXIT INT TERM
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
as_pg() { runuser -u postgres -- "$@"; }

# One certificate for PostgreSQL (direct), PgBouncer and the portal.
openssl ecparam -name prime256v1 -genkey -noout -out "$work/server.key.sec1" 2>/dev/null
openssl pkcs8 -topk8 -nocrypt -in "$work/server.key.sec1" -out "$work/server.key"
openssl req -x509 -new -key "$work/server.key" -subj "/CN=localhost" -days 2 -out "$work/server.pem" 2>/dev/null
chown postgres "$work/server.key" "$work/server.pem"; chmod 600 "$work/server.key"

# PostgreSQL, with room for the direct run's clients.
PGPORT=$(free_port)
echo "benchpw" > "$work/pw"; chown postgres "$work/pw"
as_pg "$PG_BIN/initdb" -D "$work/data" -U postgres --auth=scram-sha-256 --pwfile="$work/pw" --no-sync >/dev/null
cp /dev/null "$work/pg.log"; chown postgres "$work/pg.log"
as_pg "$PG_BIN/postgres" -D "$work/data" -p "$PGPORT" -k "$work" -c listen_addresses=127.0.0.1 \
  -c fsync=off -c max_connections=$((CLIENTS + 50)) -c shared_buffers=256MB \
  -c ssl=on -c ssl_cert_file="$work/server.pem" -c ssl_key_file="$work/server.key" >"$work/pg.log" 2>&1 &
pg_pid=$!
pids+=("$pg_pid")

for _ in $(seq 1 100); do
  PGPASSWORD=benchpw psql -h 127.0.0.1 -p "$PGPORT" -U postgres -XAtqc 'select 1' postgres >/dev/null 2>&1 && break
  sleep 0.2
done
export PGPASSWORD=benchpw
pgbench -h 127.0.0.1 -p "$PGPORT" -U postgres -i -s 10 -q postgres >/dev/null 2>&1

# PgBouncer: transaction mode, the same pool size, TLS to clients (WIRE=TLS) with the same
# certificate.
BPORT=$(free_port)
# The stored SCRAM verifier, as PgBouncer's docs recommend (with the plaintext password it runs
# PBKDF2 at every client login).
verifier=$(psql -h 127.0.0.1 -p "$PGPORT" -U postgres -XAtqc "select passwd from pg_shadow where usename = 'postgres'" postgres)
echo "\"postgres\" \"$verifier\"" > "$work/userlist.txt"
cat > "$work/pgbouncer.ini" <<EOF
[databases]
postgres = host=127.0.0.1 port=$PGPORT dbname=postgres
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $BPORT
unix_socket_dir =
auth_type = scram-sha-256
auth_file = $work/userlist.txt
pool_mode = transaction
default_pool_size = $POOL
max_client_conn = 20000
$(if [ "$WIRE" = TLS ]; then printf '%s\n' "client_tls_sslmode = require" "client_tls_cert_file = $work/server.pem" "client_tls_key_file = $work/server.key"; fi)
logfile = $work/pgbouncer.log
EOF
chown postgres "$work/pgbouncer.ini" "$work/userlist.txt"
as_pg bash -c "ulimit -n $(ulimit -Hn); exec pgbouncer -q $work/pgbouncer.ini" &
sleep 0.5
bouncer_pid=$(pgrep -n -u postgres -x pgbouncer)
pids+=("$bouncer_pid")

# The portal: the same pool size and certificate.
PPORT=$(free_port); PADMIN=$(free_port)
echo "postgres: benchpw" > "$work/users.yaml"
cat > "$work/portal.yaml" <<EOF
engine: postgres
listen: 127.0.0.1:$PPORT
admin: 127.0.0.1:$PADMIN
$(if [ "$WIRE" = TLS ]; then echo "tls: {mode: terminate, certFile: \"$work/server.pem\", keyFile: \"$work/server.key\"}"; else echo "tls: {mode: disabled}"; fi)
limits: {maxConnections: 20000, maxNegotiating: 20000, maxNegotiatingPerClient: 0, maxConnectionsPerClient: 0, connectionRatePerClient: 0}
healthCheck: {interval: 1s, credentials: {username: postgres, password: benchpw}}
timeouts: {client: 1h}
pooling: {mode: transaction, poolSize: $POOL, queueTimeout: 30s, auth: {usersFile: "$work/users.yaml"}}
backends: [{name: pg, address: "127.0.0.1:$PGPORT"}]
EOF
env RUST_LOG=warn ${PORTAL_THREADS:+TOKIO_WORKER_THREADS=$PORTAL_THREADS} "$PORTAL_BIN" --config "$work/portal.yaml" >"$work/portal.log" 2>&1 &
portal_pid=$!
pids+=("$portal_pid")
for _ in $(seq 1 100); do
  curl -sf "http://127.0.0.1:$PADMIN/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done

cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
tick=$(getconf CLK_TCK)
backends() {
  psql -h 127.0.0.1 -p "$PGPORT" -U postgres -XAtqc \
    "select count(*) from pg_stat_activity where backend_type = 'client backend' and pid <> pg_backend_pid()" postgres
}

run() { # name port proxy_pid mode
  local name=$1 port=$2 pid=$3 mode=$4 logdir="$work/log-$1-$4"
  mkdir -p "$logdir"
  # Only this contender's backends: the others' pooled connections are closed first.
  psql -h 127.0.0.1 -p "$PGPORT" -U postgres -XAtqc \
    "select count(pg_terminate_backend(pid)) from pg_stat_activity where backend_type = 'client backend' and pid <> pg_backend_pid()" postgres >/dev/null
  local c0=0; [ "$pid" != - ] && c0=$(cpu "$pid")
  ( sleep $((SECS / 2 + 2)); backends > "$logdir/backends" ) &
  local sampler=$!
  local out
  out=$(cd "$logdir" && PGSSLMODE=$SSLMODE pgbench -h 127.0.0.1 -p "$port" -U postgres -S -n \
        -c "$CLIENTS" -j "$THREADS" -T "$SECS" -M "$mode" -l postgres 2>&1) || true
  wait "$sampler" || true
  local c1=0; [ "$pid" != - ] && c1=$(cpu "$pid")
  local tps txs failed errors
  errors=$(echo "$out" | sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' | head -1)
  errors="${errors:-0} failed, $(echo "$out" | grep -c 'aborted in command' || true) clients aborted"
  echo "$out" | grep -m1 -E 'error|ERROR' > "$logdir/first-error" || true
  tps=$(echo "$out" | sed -n 's/^tps = \([0-9.]*\).*/\1/p' | head -1)
  txs=$(echo "$out" | sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p')
  if [ -z "$tps" ] || [ -z "$txs" ] || [ "$txs" = 0 ]; then
    failed=$(echo "$out" | grep -m1 -i 'error' || echo "no result")
    printf '| %s | %s | failed: %s | | | | | |\n' "$name" "$mode" "$failed"
    return
  fi
  local pct
  pct=$(cat "$logdir"/pgbench_log.* | awk '{print $3}' | sort -n | awk '{a[NR]=$1} END {printf "%.2f | %.2f", a[int(NR*0.5)]/1000, a[int(NR*0.99)]/1000}')
  local cpu_per
  if [ "$pid" = - ]; then cpu_per="—"; else
    cpu_per=$(awk -v a="$c0" -v b="$c1" -v t="$tick" -v n="$txs" 'BEGIN {printf "%.3f", (b - a) / t / n * 1000}')
  fi
  printf '| %s | %s | %.0f | %s | %s | %s | %s |\n' "$name" "$mode" "$tps" "$pct" "$cpu_per" "$(cat "$logdir/backends")" "$errors"
  if [ -s "$logdir/first-error" ]; then first_errors+=("$name $mode: $(cat "$logdir/first-error")"); fi
}
first_errors=()

echo "## PostgreSQL transaction pooling: pgbench -S, $CLIENTS clients ($WIRE), pool $POOL, ${SECS}s per run"
echo
echo "$(nproc) cores; PostgreSQL 15, $(pgbouncer --version | head -1), the portal (release build, ${PORTAL_THREADS:-one per core} event-loop thread(s))."
echo
echo "| contender | mode | TPS | p50 ms | p99 ms | proxy CPU s / 1,000 tx | backends | errors |"
echo "|---|---|---|---|---|---|---|---|"
for mode in $MODES; do
  run direct "$PGPORT" - "$mode"
  run pgbouncer "$BPORT" "$bouncer_pid" "$mode"
  run portal "$PPORT" "$portal_pid" "$mode"
done
echo
for e in "${first_errors[@]}"; do echo "- first error, $e"; done
echo

# Memory per idle client (TLS or not, as WIRE says): each proxy's RSS with N logged-in clients that ran one query
# and sit idle, minus its RSS before the first count (a later count's clients reuse memory the
# earlier ones freed, so each count is measured from the same start); the same psycopg clients
# for both, one proxy at a time.
# psycopg waits with select() unless told otherwise, which stops at file descriptor 1,024.
echo "| idle $WIRE clients | portal RSS MiB | portal KiB per client | PgBouncer RSS MiB | PgBouncer KiB per client |"
echo "|---|---|---|---|---|"
idle() { # port pid n base
  PSYCOPG_WAIT_FUNC=wait_epoll /usr/bin/python3 - "$1" "$3" "$2" "$4" "$SSLMODE" <<'EOF'
import sys, psycopg, time
port, n, pid, base, sslmode = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
rss = lambda: int([l for l in open(f"/proc/{pid}/status") if l.startswith("VmRSS")][0].split()[1])
conns = []
for _ in range(n):
    c = psycopg.connect(f"host=127.0.0.1 port={port} user=postgres password=benchpw dbname=postgres sslmode={sslmode}", autocommit=True)
    c.execute("SELECT 1")
    conns.append(c)
time.sleep(2)
now = rss()
print(f"{now / 1024:.1f} | {(now - base) / n:.2f}")
for c in conns:
    c.close()
EOF
}
rss() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
portal_base=$(rss "$portal_pid")
bouncer_base=$(rss "$bouncer_pid")
for n in $IDLE; do
  p=$(idle "$PPORT" "$portal_pid" "$n" "$portal_base")
  sleep 2
  b=$(idle "$BPORT" "$bouncer_pid" "$n" "$bouncer_base")
  sleep 2
  echo "| $n | $p | $b |"
done

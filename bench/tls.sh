#!/usr/bin/env bash
# TLS termination benchmark: the portal against HAProxy, same certificate (ECDSA P-256), same
# thread count, same plaintext redis-server behind both, in one run.
#   bench/tls.sh                 # 3 repetitions (medians): 10 s of handshakes, 100k requests
#   SECONDS_HS=5 REQUESTS=50000 REPS=1 bench/tls.sh
# Each repetition alternates which proxy goes first, so both see the same machine load.
# Needs: openssl, haproxy, redis-server, redis-tools (redis-benchmark with --tls), a Rust
# toolchain. Prints figures; it is not a test. Everything listens on 127.0.0.1; every process
# it starts is stopped by its PID.
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_HS="${SECONDS_HS:-10}"
REQUESTS="${REQUESTS:-100000}"
CLIENTS="${CLIENTS:-50}"
REPS="${REPS:-3}"
THREADS="${THREADS:-$(nproc)}"

[ -n "${NO_BUILD:-}" ] || cargo build --release -q -p dbportal-portal --bin portal
PORTAL_BIN="${CARGO_TARGET_DIR:-target}/release/portal"

work="$(mktemp -d /tmp/dbportal-tls-bench.XXXXXX)"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
wait_port() {
    for _ in $(seq 1 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    echo "port $1 did not open" >&2
    return 1
}

# One CA and one server certificate, used by both proxies.
openssl ecparam -name prime256v1 -genkey -noout -out "$work/ca.key" 2>/dev/null
openssl req -x509 -new -key "$work/ca.key" -subj "/CN=bench CA" -days 2 -out "$work/ca.pem" 2>/dev/null
openssl ecparam -name prime256v1 -genkey -noout -out "$work/server.key.sec1" 2>/dev/null
openssl pkcs8 -topk8 -nocrypt -in "$work/server.key.sec1" -out "$work/server.key"
openssl req -new -key "$work/server.key" -subj "/CN=localhost" -out "$work/server.csr" 2>/dev/null
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' >"$work/ext"
openssl x509 -req -in "$work/server.csr" -CA "$work/ca.pem" -CAkey "$work/ca.key" \
    -CAcreateserial -days 2 -extfile "$work/ext" -out "$work/server.pem" 2>/dev/null
cat "$work/server.pem" "$work/server.key" >"$work/haproxy.pem"

redis_port="$(free_port)"
redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no \
    --dir "$work" >/dev/null 2>&1 &
pids+=($!)
wait_port "$redis_port"

portal_port="$(free_port)"
admin_port="$(free_port)"
cat >"$work/portal.yaml" <<EOF
engine: redis
port: $portal_port
listen: "127.0.0.1:$portal_port"
admin: "127.0.0.1:$admin_port"
routing: {mode: first}
backends:
  - {name: r0, address: "127.0.0.1:$redis_port"}
tls:
  certFile: "$work/server.pem"
  keyFile: "$work/server.key"
EOF
# The portal's runtime has one worker per core; HAProxy gets as many threads.
RUST_LOG=warn TOKIO_WORKER_THREADS="$THREADS" "$PORTAL_BIN" --config "$work/portal.yaml" \
    >"$work/portal.log" 2>&1 &
pids+=($!)
wait_port "$portal_port"

haproxy_port="$(free_port)"
cat >"$work/haproxy.cfg" <<EOF
global
    nbthread $THREADS
    maxconn 4000
    ssl-default-bind-options ssl-min-ver TLSv1.2
defaults
    mode tcp
    timeout connect 5s
    timeout client 1m
    timeout server 1m
frontend tls
    bind 127.0.0.1:$haproxy_port ssl crt $work/haproxy.pem
    default_backend redis
backend redis
    server r0 127.0.0.1:$redis_port
EOF
/usr/sbin/haproxy -f "$work/haproxy.cfg" -db >"$work/haproxy.log" 2>&1 &
pids+=($!)
wait_port "$haproxy_port"

load_before="$(cut -d' ' -f1-3 /proc/loadavg)"
echo "TLS benchmark: $(nproc) cores, $THREADS proxy threads, ECDSA P-256 certificate, redis-server $(redis-server --version | grep -o 'v=[0-9.]*')"
echo "portal: $("$PORTAL_BIN" --version 2>/dev/null || echo portal) (rustls, ring)   haproxy: $(haproxy -v | head -1 | cut -d' ' -f3) ($(openssl version | cut -d' ' -f1-2))"
echo

# Full handshakes per second: openssl s_time -new (no resumption), TLS 1.3 and 1.2, bounded
# by time. Two clients in parallel so the client side is not the bottleneck of one core.
handshakes() { # port version -> connections per second (sum of both clients)
    local port="$1" version="$2" total=0 clients=()
    for i in 1 2; do
        timeout $((SECONDS_HS + 30)) openssl s_time -connect "127.0.0.1:$port" -new "$version" \
            -time "$SECONDS_HS" >"$work/stime.$i" 2>&1 &
        clients+=($!)
    done
    wait "${clients[@]}" || true
    for i in 1 2; do
        # "N connections in T real seconds, B bytes read per connection"
        local line n t
        line="$(grep -E 'connections in [0-9.]+ real seconds' "$work/stime.$i" | head -1)"
        n="$(echo "$line" | awk '{print $1}')"
        t="$(echo "$line" | awk '{print $4}')"
        total="$(python3 -c "print(${total} + ${n:-0} / max(${t:-1}, 0.001))")"
    done
    printf '%.0f' "$total"
}

median() { # numbers... -> median
    python3 -c 'import statistics, sys; print(f"{statistics.median(float(x) for x in sys.argv[1:]):.0f}")' "$@"
}
# redis-benchmark over TLS: requests per second through one proxy.
rb() { # port -> "test rps" lines
    timeout 300 redis-benchmark --tls --cacert "$work/ca.pem" -h 127.0.0.1 -p "$1" \
        -n "$REQUESTS" -c "$CLIENTS" -t ping,set,get -q 2>/dev/null |
        tr '\r' '\n' | grep -E 'requests per second' |
        sed -E 's/^([A-Z_]+): ([0-9.]+) requests per second.*/\1 \2/'
}

declare -A hs
for rep in $(seq 1 "$REPS"); do
    if [ $((rep % 2)) -eq 1 ]; then order="portal haproxy"; else order="haproxy portal"; fi
    for version in -tls1_3 -tls1_2; do
        for proxy in $order; do
            port="$portal_port"; [ "$proxy" = haproxy ] && port="$haproxy_port"
            hs[$proxy$version]+=" $(handshakes "$port" "$version")"
        done
    done
    for proxy in $order; do
        port="$portal_port"; [ "$proxy" = haproxy ] && port="$haproxy_port"
        rb "$port" >>"$work/rb.$proxy"
    done
    echo "repetition $rep/$REPS done" >&2
done

echo "$REPS repetitions, medians; load average before: $load_before; after: $(cut -d' ' -f1-3 /proc/loadavg)"
echo
printf '%-34s %12s %12s %8s\n' "full TLS handshakes/s (s_time -new)" portal haproxy ratio
for version in -tls1_3 -tls1_2; do
    # shellcheck disable=SC2086
    p="$(median ${hs[portal$version]})"; h="$(median ${hs[haproxy$version]})"
    printf '%-34s %12s %12s %8s\n' "  ${version#-}" "$p" "$h" \
        "$(python3 -c "print(f'{$p / max($h, 1):.2f}')")"
done
echo

printf '%-34s %12s %12s %8s\n' "redis-benchmark over TLS, req/s" portal haproxy ratio
for test in $(awk '{print $1}' "$work/rb.portal" | awk '!seen[$0]++'); do
    # shellcheck disable=SC2046
    p="$(median $(awk -v t="$test" '$1 == t {print $2}' "$work/rb.portal"))"
    # shellcheck disable=SC2046
    h="$(median $(awk -v t="$test" '$1 == t {print $2}' "$work/rb.haproxy"))"
    printf '%-34s %12.0f %12.0f %8s\n' "  $test (-c $CLIENTS)" "$p" "${h:-0}" \
        "$(python3 -c "print(f'{$p / max(${h:-0}, 1):.2f}')")"
done
echo
echo "portal RSS after the run: $(ps -o rss= -p "${pids[1]}" | tr -d ' ') KiB;" \
    "haproxy: $(ps -o rss= -p "${pids[2]}" | tr -d ' ') KiB"

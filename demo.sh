#!/usr/bin/env bash
# Runs the portal on its embedded default configuration (portal/examples/portal.yaml):
# 127.0.0.1:6380 in front of a redis-server on 127.0.0.1:6379, admin endpoint on
# 127.0.0.1:8404. Starts that redis-server (and installs it from Debian) when none is there.
set -euo pipefail
cd "$(dirname "$0")"

if ! command -v redis-server >/dev/null; then
  apt-get update
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server redis-tools
fi

if ! (exec 3<>/dev/tcp/127.0.0.1/6379) 2>/dev/null; then
  redis_dir=$(mktemp -d)
  redis-server --port 6379 --bind 127.0.0.1 --dir "$redis_dir" --save '' --appendonly no \
    >"$redis_dir/redis.log" 2>&1 &
  redis_pid=$!
  trap 'kill "$redis_pid" 2>/dev/null || true; wait "$redis_pid" 2>/dev/null || true; rm -rf "$redis_dir"' EXIT
  echo "started redis-server on 127.0.0.1:6379 (pid $redis_pid)"
fi

echo "try: redis-cli -p 6380 ping    curl -s 127.0.0.1:8404/status    Ctrl-C to stop"
cargo run --release -p dbportal-portal --bin portal

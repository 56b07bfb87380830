#!/usr/bin/env bash
# Starts a throwaway PostgreSQL server for the test suite (Unix socket only, no TCP port) and
# prints the SQLAlchemy URL of its admin database. Installs the server from Debian if needed.
# Usage: url=$(bash .ci/postgres.sh start DIR); ...; bash .ci/postgres.sh stop DIR
set -euo pipefail
action=${1:?start|stop}; dir=${2:?directory}
pgbin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

case "$action" in
start)
  if [ -z "$(pgbin)" ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq postgresql >&2
  fi
  bin=$(pgbin)
  mkdir -p "$dir"
  [ "$(id -u)" = 0 ] && chown postgres "$dir"
  as_pg "$bin/initdb" -D "$dir/data" -A trust -U postgres >&2
  as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w \
    -o "-k $dir -c listen_addresses='' -c fsync=on" start >&2
  echo "postgresql+psycopg://postgres@/postgres?host=$dir"
  ;;
stop)
  bin=$(pgbin)
  as_pg "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >&2 || true
  ;;
esac

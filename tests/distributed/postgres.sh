#!/usr/bin/env bash
# Run a command next to a throw-away PostgreSQL server:  tests/distributed/postgres.sh CMD [ARGS...]
#
# initdb into a fresh temporary folder, listen on a unix socket in it only (no TCP port), create the
# database `shears`, export SHEARS_TEST_POSTGRES_URL for CMD, and stop the server and delete the
# folder when this script exits -- on success, on failure and on Ctrl-C alike (the trap).
set -euo pipefail

pg_bin=""
for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r) "$(dirname "$(command -v initdb 2>/dev/null || echo /nonexistent/x)")"; do
    if [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ]; then pg_bin=$dir; break; fi
done
if [ -z "$pg_bin" ]; then
    echo "test-distributed: PostgreSQL is not installed (initdb/pg_ctl not found): apt-get install -y postgresql" >&2
    exit 1
fi

as_server=()
tmp=$(mktemp -d "${TMPDIR:-/tmp}/shears-pg.XXXXXX")
if [ "$(id -u)" = 0 ]; then  # initdb refuses root: run the server as Debian's postgres user
    if ! id postgres >/dev/null 2>&1; then
        echo "test-distributed: running as root but there is no 'postgres' user to run the server as" >&2
        exit 1
    fi
    chown postgres "$tmp"
    as_server=(runuser -u postgres --)
fi
stop() {
    "${as_server[@]}" "$pg_bin/pg_ctl" -D "$tmp/data" -m immediate -w stop >/dev/null 2>&1 || true
    rm -rf "$tmp"
}
trap stop EXIT

"${as_server[@]}" "$pg_bin/initdb" -D "$tmp/data" -A trust -U shears --no-sync >/dev/null
"${as_server[@]}" "$pg_bin/pg_ctl" -D "$tmp/data" -l "$tmp/server.log" -w \
    -o "-c listen_addresses='' -k $tmp -c fsync=off -c max_connections=200" start >/dev/null
"${as_server[@]}" "$pg_bin/createdb" -h "$tmp" -U shears shears
export SHEARS_TEST_POSTGRES_URL="postgresql+psycopg2://shears@/shears?host=$tmp"
echo "test-distributed: PostgreSQL $("$pg_bin/postgres" --version | awk '{print $3}') on unix socket $tmp"
"$@"

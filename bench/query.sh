#!/usr/bin/env bash
# Measures the query API on 1,000,000 normalized rows with wrk over loopback, next to pgbench
# running the same SQL on the same database, in one run. Usage: bench/query.sh [rows] [seconds]
# (needs DATABASE_URL, e.g. from `cargo xtask up`, and wrk: apt-get install wrk).
# The full suite (`just bench`) supersedes it.
set -euo pipefail
cd "$(dirname "$0")/.."
rows=${1:-1000000}; secs=${2:-10}
: "${DATABASE_URL:?set DATABASE_URL (cargo xtask up prints one)}"
work=target/bench; mkdir -p "$work"
cargo build --release -q -p etl-query
db=bench_query_$$
psql -q "$DATABASE_URL" -c "CREATE DATABASE $db"
url="${DATABASE_URL%/*}/$db"
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null; psql -q "$DATABASE_URL" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)"' EXIT
server=
DATABASE_URL=$url ./target/release/etl-query migrate >/dev/null 2>&1
psql -q "$url" <<SQL
INSERT INTO normalized_data (source, source_id, name, value, description)
SELECT 'source-' || (g % 4), g::text, 'item ' || g, (g % 1000) / 7.0,
       CASE WHEN g % 100 = 0 THEN 'special offer ' || g ELSE 'regular item ' || g END
FROM generate_series(1, $rows) g;
INSERT INTO etl_checkpoint (source, normalized_rows)
SELECT source, count(*) FROM normalized_data GROUP BY source;
VACUUM ANALYZE;
SQL
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
DATABASE_URL=$url QUERY_ADDR=127.0.0.1:$port RUST_LOG=warn ./target/release/etl-query >/dev/null 2>&1 &
server=$!
until curl -sf -o /dev/null "http://127.0.0.1:$port/health"; do sleep 0.1; done

# The SQL each request runs (see services/query/src/data.rs and stats.rs).
page='SELECT id, source, source_id, name, value, description, created_at, updated_at FROM normalized_data'
count_all='SELECT coalesce(sum(normalized_rows), 0)::bigint FROM etl_checkpoint;'
cat > "$work/first.sql" <<SQL
$page ORDER BY id LIMIT 11 OFFSET 0;
$count_all
SQL
cat > "$work/deep.sql" <<SQL
$page ORDER BY id LIMIT 11 OFFSET 500000;
$count_all
SQL
cat > "$work/search.sql" <<SQL
$page WHERE (name ILIKE '%special%' OR description ILIKE '%special%') ORDER BY id LIMIT 11 OFFSET 0;
SELECT count(*) FROM (SELECT 1 FROM normalized_data WHERE name ILIKE '%special%' OR description ILIKE '%special%' LIMIT 1001) capped;
SQL
cat > "$work/stats.sql" <<'SQL'
SELECT source, count(*), min(value), max(value), avg(value) FROM normalized_data GROUP BY source;
SQL

printf '%-44s %12s %9s %9s %12s\n' "endpoint ($rows rows, $(nproc) cores)" "API req/s" "p50 ms" "p99 ms" "pgbench tps"
measure() {
  local name=$1 path=$2 sql=$3
  local out; out=$(wrk -t1 -c32 -d"${secs}s" --latency "http://127.0.0.1:$port$path")
  local rps p50 p99
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  p50=$(awk '$1=="50%" {print $2}' <<<"$out"); p99=$(awk '$1=="99%" {print $2}' <<<"$out")
  local tps; tps=$(pgbench -n -c 8 -j 2 -T "$secs" -f "$sql" "$url" 2>/dev/null | awk '/^tps/ {print $3; exit}')
  printf '%-44s %12s %9s %9s %12s\n' "$name" "$rps" "$p50" "$p99" "$tps"
}
measure "/data?page=1&page_size=10" "/data?page=1&page_size=10" "$work/first.sql"
measure "/data?page=50001&page_size=10 (deep)" "/data?page=50001&page_size=10" "$work/deep.sql"
measure "/data?search=special (1% of rows)" "/data?search=special" "$work/search.sql"
measure "/stats (cached 5 s; pgbench: uncached)" "/stats" "$work/stats.sql"

#!/usr/bin/env bash
# Measures the ingester on a 1,000,000-row CSV served over HTTP on loopback, next to psql's own
# \copy of the same file, on the same Postgres, in one run. Prints rows/s and peak memory.
# Usage: bench/ingest-csv.sh [rows]   (needs DATABASE_URL, e.g. from `cargo xtask up`)
# This is the issue-3 measurement; the full benchmark suite (`just bench`) supersedes it.
set -euo pipefail
cd "$(dirname "$0")/.."
rows=${1:-1000000}
: "${DATABASE_URL:?set DATABASE_URL (cargo xtask up prints one)}"
work=target/bench; mkdir -p "$work"
csv="$work/data-$rows.csv"
[ -f "$csv" ] || python3 - "$rows" "$csv" <<'PY'
import random, sys
n, path = int(sys.argv[1]), sys.argv[2]
rnd = random.Random(42)
with open(path, "w") as f:
    f.write("id,name,value,description\n")
    for i in range(1, n + 1):
        f.write(f"{i},item {i},{rnd.uniform(0, 1000):.4f},\"description of item {i}, with a comma\"\n")
PY
cargo build --release -q -p etl-ingester
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
python3 -m http.server "$port" --bind 127.0.0.1 --directory "$work" >/dev/null 2>&1 &
server=$!; trap 'kill $server' EXIT
until curl -sf -o /dev/null "http://127.0.0.1:$port/"; do sleep 0.1; done

db=bench_$$
psql -q "$DATABASE_URL" -c "CREATE DATABASE $db"
url="${DATABASE_URL%/*}/$db"
DATABASE_URL=$url ./target/release/etl-ingester migrate >/dev/null
psql -q "$url" -c "CREATE TABLE typed (id bigint, name text, value float8, description text)" \
               -c "CREATE TABLE raw_like (source text, source_id text, data jsonb, UNIQUE (source, source_id))"

now() { date +%s.%N; }
t0=$(now); psql -q "$url" -c "\\copy typed FROM '$csv' CSV HEADER"; t1=$(now)
copy_s=$(echo "$t1 - $t0" | bc)
t0=$(now)
psql -q "$url" -c "CREATE TEMP TABLE t (id text, name text, value text, description text)" \
  -c "\\copy t FROM '$csv' CSV HEADER" \
  -c "INSERT INTO raw_like SELECT 'csv', id, jsonb_build_object('id',id,'name',name,'value',value,'description',description) FROM t"
t1=$(now); copy_jsonb_s=$(echo "$t1 - $t0" | bc)

cat > "$work/sources.toml" <<TOML
[[source]]
name = "bench"
kind = "csv"
url = "http://127.0.0.1:$port/$(basename "$csv")"
mapping = { source_id = "id", name = "name", value = "value", description = "description" }
TOML
run() {
  /usr/bin/time -f "%M" -o "$work/rss" env DATABASE_URL="$url" SOURCES_FILE="$work/sources.toml" \
    RUST_LOG=warn ./target/release/etl-ingester ingest >/dev/null
}
t0=$(now); run; t1=$(now); first_s=$(echo "$t1 - $t0" | bc); first_rss=$(cat "$work/rss")
t0=$(now); run; t1=$(now); again_s=$(echo "$t1 - $t0" | bc); again_rss=$(cat "$work/rss")
landed=$(psql -tA "$url" -c "SELECT count(*) FROM raw_csv_data")
psql -q "$DATABASE_URL" -c "DROP DATABASE $db WITH (FORCE)"

rate() { echo "scale=0; $rows / $1" | bc; }
printf '%-52s %10s %12s %10s\n' "measure ($rows rows, $(nproc) cores)" seconds rows/s "peak RSS"
printf '%-52s %10.2f %12s %10s\n' "psql \\copy into a typed table" "$copy_s" "$(rate "$copy_s")" -
printf '%-52s %10.2f %12s %10s\n' "psql \\copy + INSERT into a jsonb table, unique key" "$copy_jsonb_s" "$(rate "$copy_jsonb_s")" -
printf '%-52s %10.2f %12s %9sK\n' "etl-ingester, first ingest over HTTP" "$first_s" "$(rate "$first_s")" "$first_rss"
printf '%-52s %10.2f %12s %9sK\n' "etl-ingester, re-ingest of the unchanged file" "$again_s" "$(rate "$again_s")" "$again_rss"
echo "rows landed: $landed; ingest/\\copy ratio: $(echo "scale=2; $copy_s / $first_s" | bc)"

#!/usr/bin/env bash
# Measures the normalizer on a 1,000,000-row raw backlog next to Postgres's own set-based
# INSERT … SELECT … ON CONFLICT of the same rows, then the delay from a raw commit to the
# normalized row at idle. One run, one database. Usage: bench/normalize.sh [rows]
# (needs DATABASE_URL, e.g. from `cargo xtask up`). The full suite (`just bench`) supersedes it.
set -euo pipefail
cd "$(dirname "$0")/.."
rows=${1:-1000000}
: "${DATABASE_URL:?set DATABASE_URL (cargo xtask up prints one)}"
work=target/bench; mkdir -p "$work"
cargo build --release -q -p etl-normalizer

db=bench_norm_$$
psql -q "$DATABASE_URL" -c "CREATE DATABASE $db"
url="${DATABASE_URL%/*}/$db"
trap 'kill $normalizer 2>/dev/null; wait $normalizer 2>/dev/null; psql -q "$DATABASE_URL" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)"' EXIT
normalizer=
DATABASE_URL=$url ./target/release/etl-normalizer migrate >/dev/null
psql -q "$url" <<SQL
INSERT INTO raw_csv_data (source, source_id, data)
SELECT 'bench', g::text, jsonb_build_object('id', g::text, 'name', 'item ' || g,
       'value', round((random() * 1000)::numeric, 4)::text, 'description', 'description of item ' || g)
FROM generate_series(1, $rows) g;
CREATE TABLE ceiling (LIKE normalized_data INCLUDING ALL);
VACUUM ANALYZE raw_csv_data;
SQL

now() { date +%s.%N; }
t0=$(now)
psql -q "$url" -c "INSERT INTO ceiling (source, source_id, name, value, description)
  SELECT source, source_id, data->>'name', (data->>'value')::float8, data->>'description' FROM raw_csv_data
  ON CONFLICT (source, source_id) DO UPDATE SET name = EXCLUDED.name, value = EXCLUDED.value,
     description = EXCLUDED.description, updated_at = now()"
t1=$(now); ceiling_s=$(echo "$t1 - $t0" | bc)

cat > "$work/normalize-sources.toml" <<TOML
[[source]]
name = "bench"
kind = "csv"
url = "http://127.0.0.1:1/unused.csv"
mapping = { source_id = "id", name = "name", value = "value", description = "description" }
TOML
caught_up() {
  psql -tA "$url" -c "SELECT coalesce((SELECT last_processed_id FROM etl_checkpoint WHERE source = 'bench'), 0)
                        >= (SELECT max(change_id) FROM raw_csv_data WHERE source = 'bench')"
}
t0=$(now)
DATABASE_URL="$url" SOURCES_FILE="$work/normalize-sources.toml" NORMALIZER_ADMIN_ADDR=127.0.0.1:0 \
  RUST_LOG=warn ./target/release/etl-normalizer >/dev/null 2>&1 &
normalizer=$!
until [ "$(caught_up)" = t ]; do sleep 0.05; done
t1=$(now); ours_s=$(echo "$t1 - $t0" | bc)

# Latency at idle: commit one raw row (with its NOTIFY) and wait for its normalized row.
latencies=$(psql -qtA "$url" 2>&1 <<'SQL'
CREATE PROCEDURE probe(n int) LANGUAGE plpgsql AS $$
DECLARE t0 timestamptz; ms float8[] := '{}';
BEGIN
  FOR i IN 1..n LOOP
    PERFORM pg_advisory_xact_lock(1163152433, hashtext('bench'));
    INSERT INTO raw_csv_data (source, source_id, data)
      VALUES ('bench', 'probe-' || i, jsonb_build_object('id', 'probe-' || i, 'name', 'p', 'value', '1', 'description', ''));
    PERFORM pg_notify('etl_raw_ready', 'bench');
    COMMIT;
    t0 := clock_timestamp();
    WHILE NOT EXISTS (SELECT 1 FROM normalized_data WHERE source = 'bench' AND source_id = 'probe-' || i) LOOP
      PERFORM pg_sleep(0.0005);
    END LOOP;
    ms := ms || extract(epoch FROM clock_timestamp() - t0) * 1000;
    COMMIT;
    PERFORM pg_sleep(0.05);
  END LOOP;
  RAISE NOTICE '%', (SELECT format('p50 %s ms, p99 %s ms, max %s ms',
      round(percentile_cont(0.5) WITHIN GROUP (ORDER BY x)::numeric, 1),
      round(percentile_cont(0.99) WITHIN GROUP (ORDER BY x)::numeric, 1),
      round(max(x)::numeric, 1)) FROM unnest(ms) x);
END $$;
CALL probe(100);
SQL
)
peak_rss=$(awk '/VmHWM/ {print $2}' "/proc/$normalizer/status")
kill -TERM $normalizer; wait $normalizer || true
rate() { echo "scale=0; $rows / $1" | bc; }
printf '%-60s %10s %12s\n' "measure ($rows raw rows, $(nproc) cores)" seconds rows/s
printf '%-60s %10.2f %12s\n' "Postgres INSERT … SELECT … ON CONFLICT into an empty table" "$ceiling_s" "$(rate "$ceiling_s")"
printf '%-60s %10.2f %12s\n' "etl-normalizer, backlog to checkpoint" "$ours_s" "$(rate "$ours_s")"
echo "normalizer peak RSS: $peak_rss KiB; ratio to the ceiling: $(echo "scale=2; $ceiling_s / $ours_s" | bc)"
echo "raw commit -> normalized row at idle (100 probes): $latencies"

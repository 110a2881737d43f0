-- Rows deleted upstream, for sources whose every run is a complete snapshot
-- (`deletes = "snapshot"`): after a successful run, a raw row it did not see is tombstoned
-- (`deleted_at` set, with a new change id, its data kept) and the normalizer withdraws it. A row
-- seen again is revived by the next upsert.
ALTER TABLE raw_api_data ADD COLUMN deleted_at timestamptz;
ALTER TABLE raw_csv_data ADD COLUMN deleted_at timestamptz;

-- The ids a snapshot run has landed so far, one row per id; emptied when the run ends.
-- Unlogged: a crash fails the run anyway, and a failed run deletes nothing.
CREATE UNLOGGED TABLE etl_run_seen (
    run_id    bigint NOT NULL,
    source_id text   NOT NULL,
    PRIMARY KEY (run_id, source_id)
);

-- Ingester: raw rows a run tombstoned. Normalizer: tombstones it applied (withdrawn rows).
ALTER TABLE etl_runs ADD COLUMN records_deleted bigint NOT NULL DEFAULT 0;

-- Tombstones are changes still to apply, but no longer raw rows.
CREATE OR REPLACE VIEW etl_pending AS
SELECT r.source,
       count(*) FILTER (WHERE r.deleted_at IS NULL) AS raw_rows,
       count(*) FILTER (WHERE r.change_id > coalesce(c.last_processed_id, 0)) AS pending_changes
FROM (
    SELECT source, change_id, deleted_at FROM raw_api_data
    UNION ALL
    SELECT source, change_id, deleted_at FROM raw_csv_data
) r
LEFT JOIN etl_checkpoint c ON c.source = r.source
GROUP BY r.source;

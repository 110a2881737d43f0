-- One ingest run per source at a time, across processes and replicas. A source's row names the
-- run that holds it; the hold is good while that run is live, i.e. while its process holds the
-- run's advisory lock (see shared/src/runs.rs), so a crashed holder frees the source without
-- clocks. `succeeded_at` is when the last successful run started: the daemons of every replica
-- run a source on its schedule only when that is a schedule ago, so each tick fetches it once.
CREATE TABLE etl_source_leases (
    source       text        PRIMARY KEY,
    run_id       bigint,
    acquired_at  timestamptz NOT NULL DEFAULT now(),
    succeeded_at timestamptz
);

-- `GET /runs?source=` and `GET /rejects?source=` read a source's newest first: one index
-- descent per page on tables that grow with every schedule tick and every bad record.
CREATE INDEX etl_runs_source_id_idx ON etl_runs (source, id);
CREATE INDEX etl_rejects_source_id_idx ON etl_rejects (source, id);

-- Initial schema: raw landing tables, the unified table, and the bookkeeping the services share.
-- Keys follow ../DESIGN: every record is identified by (source, source_id), never source_id alone,
-- because two sources of the same kind may reuse ids.

-- One sequence for every raw change. The ingester serializes writes per source (a
-- transaction-scoped advisory lock), so within one source change ids become visible in order and
-- the normalizer can checkpoint "last change id processed" without skipping a slower transaction.
CREATE SEQUENCE raw_change_id_seq AS bigint;

CREATE TABLE raw_api_data (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source      text        NOT NULL,
    source_id   text        NOT NULL,
    data        jsonb       NOT NULL,
    ingested_at timestamptz NOT NULL DEFAULT now(),
    -- Moves on insert and on every change of `data`; the normalizer reads rows above its checkpoint.
    change_id   bigint      NOT NULL DEFAULT nextval('raw_change_id_seq'),
    changed_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT raw_api_data_source_key UNIQUE (source, source_id),
    CONSTRAINT raw_api_data_source_nonempty CHECK (source <> ''),
    CONSTRAINT raw_api_data_source_id_nonempty CHECK (source_id <> '')
);
CREATE UNIQUE INDEX raw_api_data_change_idx ON raw_api_data (source, change_id);

CREATE TABLE raw_csv_data (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source      text        NOT NULL,
    source_id   text        NOT NULL,
    data        jsonb       NOT NULL,
    ingested_at timestamptz NOT NULL DEFAULT now(),
    change_id   bigint      NOT NULL DEFAULT nextval('raw_change_id_seq'),
    changed_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT raw_csv_data_source_key UNIQUE (source, source_id),
    CONSTRAINT raw_csv_data_source_nonempty CHECK (source <> ''),
    CONSTRAINT raw_csv_data_source_id_nonempty CHECK (source_id <> '')
);
CREATE UNIQUE INDEX raw_csv_data_change_idx ON raw_csv_data (source, change_id);

-- The one unified table the query API serves. `value` is deliberately not unique: values repeat.
CREATE TABLE normalized_data (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source      text             NOT NULL,
    source_id   text             NOT NULL,
    name        text             NOT NULL,
    value       double precision NOT NULL,
    description text,
    created_at  timestamptz      NOT NULL DEFAULT now(),
    updated_at  timestamptz      NOT NULL DEFAULT now(),
    CONSTRAINT normalized_data_source_key UNIQUE (source, source_id),
    CONSTRAINT normalized_data_name_nonempty CHECK (name <> ''),
    CONSTRAINT normalized_data_value_finite
        CHECK (value <> 'NaN'::float8 AND value <> 'Infinity'::float8 AND value <> '-Infinity'::float8)
);
-- `/data?source=` pages in id order within one source.
CREATE INDEX normalized_data_source_id_idx ON normalized_data (source, id);

-- One row per source: how far the normalizer has got. Replicas lock this row to claim a source.
CREATE TABLE etl_checkpoint (
    source            text        PRIMARY KEY,
    last_processed_id bigint      NOT NULL DEFAULT 0,
    last_processed_at timestamptz,
    total_processed   bigint      NOT NULL DEFAULT 0,
    updated_at        timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT etl_checkpoint_counts_nonnegative CHECK (last_processed_id >= 0 AND total_processed >= 0)
);

-- Every ingest and normalize run, so operators (and /stats) can see what happened and why it failed.
CREATE TABLE etl_runs (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    service           text        NOT NULL,
    source            text        NOT NULL,
    started_at        timestamptz NOT NULL DEFAULT now(),
    ended_at          timestamptz,
    duration_seconds  double precision,
    records_processed bigint      NOT NULL DEFAULT 0,
    records_inserted  bigint      NOT NULL DEFAULT 0,
    records_updated   bigint      NOT NULL DEFAULT 0,
    records_unchanged bigint      NOT NULL DEFAULT 0,
    records_rejected  bigint      NOT NULL DEFAULT 0,
    status            text        NOT NULL DEFAULT 'running',
    error_message     text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT etl_runs_service_known CHECK (service IN ('ingester', 'normalizer')),
    CONSTRAINT etl_runs_status_known CHECK (status IN ('running', 'success', 'failed')),
    -- A finished run has an end; a running one has none.
    CONSTRAINT etl_runs_ended_iff_finished CHECK ((status = 'running') = (ended_at IS NULL)),
    CONSTRAINT etl_runs_failed_has_error CHECK (status <> 'failed' OR error_message IS NOT NULL)
);
-- "Latest run of each service per source" for /stats.
CREATE INDEX etl_runs_latest_idx ON etl_runs (service, source, started_at DESC);
-- Finding runs left `running` by a crashed process.
CREATE INDEX etl_runs_running_idx ON etl_runs (service, source) WHERE status = 'running';

-- Every record that could not be landed or normalized, so nothing is dropped silently:
-- per source, records seen = landed + rejected (ingest) and raw rows = normalized + rejected
-- (normalize).
CREATE TABLE etl_rejects (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id     bigint      REFERENCES etl_runs (id) ON DELETE SET NULL,
    stage      text        NOT NULL,
    source     text        NOT NULL,
    -- Known for records that got far enough to have one (always at the normalize stage).
    source_id  text,
    -- Where the record was: CSV line number, REST page and item index, or the raw row's id.
    line       bigint,
    page       bigint,
    item       bigint,
    raw_id     bigint,
    reason     text        NOT NULL,
    -- The exact bytes as received; bytea because a rejected row may be invalid UTF-8 or hold NULs.
    raw        bytea       NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT etl_rejects_stage_known CHECK (stage IN ('ingest', 'normalize')),
    CONSTRAINT etl_rejects_reason_nonempty CHECK (reason <> ''),
    CONSTRAINT etl_rejects_normalize_has_source_id CHECK (stage <> 'normalize' OR source_id IS NOT NULL)
);
CREATE INDEX etl_rejects_source_idx ON etl_rejects (source, stage);
-- A raw record is either normalized or rejected, once: a fixed record replaces its reject.
CREATE UNIQUE INDEX etl_rejects_normalize_key ON etl_rejects (source, source_id) WHERE stage = 'normalize';

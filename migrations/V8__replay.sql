-- Replay: a source re-normalized from its raw rows when its mapping changes (or on demand),
-- built apart and swapped in by one transaction, so readers see the old version whole until the
-- new one replaces it whole.

-- The mapping the source's normalized rows were made with (its canonical text); NULL until the
-- normalizer first records it.
ALTER TABLE etl_checkpoint ADD COLUMN mapping_fingerprint text;

-- A source whose ordinary batch failed because its mapping cannot apply (a CSV column its rows
-- lack): why, and the newest raw change id then. It is not tried again (so it fails one run,
-- not one per poll) until a newer raw change arrives or the mapping changes.
ALTER TABLE etl_checkpoint ADD COLUMN stalled_at bigint, ADD COLUMN stalled_reason text;

-- A replay in progress (or stopped by a mapping that cannot apply: `error`): the mapping it
-- builds, how far through the raw rows it is, and what it has done.
CREATE TABLE etl_replays (
    source      text        PRIMARY KEY,
    fingerprint text        NOT NULL,
    position    bigint      NOT NULL DEFAULT 0,
    processed   bigint      NOT NULL DEFAULT 0,
    started_at  timestamptz NOT NULL DEFAULT now(),
    error       text
);

-- The version being built: its normalized rows and its rejects, per source.
CREATE TABLE normalized_replay (
    source      text             NOT NULL,
    source_id   text             NOT NULL,
    name        text             NOT NULL,
    value       double precision NOT NULL,
    description text,
    PRIMARY KEY (source, source_id)
);
CREATE TABLE etl_rejects_replay (
    source    text   NOT NULL,
    source_id text   NOT NULL,
    raw_id    bigint NOT NULL,
    reason    text   NOT NULL,
    PRIMARY KEY (source, source_id)
);

-- What the last successful run of each source learnt, for the next run to fetch less: the
-- validators of its response (a conditional GET may then be answered 304, and the run ends
-- unchanged with nothing read), and, for a REST source with `incremental`, the largest value it
-- saw at the incremental pointer. Written when the run ends, after its last batch committed, so
-- a run that crashes never moves it past records that did not land.
CREATE TABLE etl_source_state (
    source        text        PRIMARY KEY,
    -- The URL the validators belong to: a changed URL in the sources file starts afresh.
    url           text        NOT NULL,
    etag          text,
    last_modified text,
    incremental   text,
    updated_at    timestamptz NOT NULL DEFAULT now()
);

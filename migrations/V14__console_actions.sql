-- The operations console (served by the query service) shows each source as its ingester runs
-- it, and asks for actions without knowing where the other services are: both go through here.

-- Each source as the ingester's sources file declares it, written by every ingester at start:
-- its kind, schedule, URL (without credentials or query values) and mapping.
CREATE TABLE etl_source_config (
    source           text        PRIMARY KEY,
    kind             text        NOT NULL CHECK (kind IN ('rest', 'csv')),
    schedule_seconds bigint      NOT NULL CHECK (schedule_seconds > 0),
    url              text        NOT NULL,
    mapping          jsonb       NOT NULL,
    updated_at       timestamptz NOT NULL DEFAULT now()
);

-- Actions asked for (run a source now: an ingester takes it; replay it: a normalizer does),
-- kept as history: who asked, when, and when a service took it.
CREATE TABLE etl_requests (
    id           bigserial   PRIMARY KEY,
    source       text        NOT NULL,
    action       text        NOT NULL CHECK (action IN ('run', 'replay')),
    requested_by text        NOT NULL,
    requested_at timestamptz NOT NULL DEFAULT now(),
    taken_at     timestamptz
);
-- What each service polls for: the oldest request of its action not yet taken.
CREATE INDEX etl_requests_pending_idx ON etl_requests (action, id) WHERE taken_at IS NULL;

-- What the query API needs to stay fast on large tables.

-- Case-insensitive substring search on name and description (`ILIKE '%term%'`) through trigram
-- indexes instead of a full scan. pg_trgm is a trusted extension: a database owner may create it.
CREATE EXTENSION IF NOT EXISTS pg_trgm;
CREATE INDEX normalized_data_name_trgm_idx ON normalized_data USING gin (name gin_trgm_ops);
CREATE INDEX normalized_data_description_trgm_idx ON normalized_data USING gin (description gin_trgm_ops);

-- Rows of normalized_data per source, kept exact by the normalizer in the same transaction as
-- the rows themselves, so `/data` totals cost one index lookup instead of a COUNT(*) scan.
ALTER TABLE etl_checkpoint ADD COLUMN normalized_rows bigint NOT NULL DEFAULT 0;
UPDATE etl_checkpoint c
SET normalized_rows = (SELECT count(*) FROM normalized_data n WHERE n.source = c.source);
ALTER TABLE etl_checkpoint
    ADD CONSTRAINT etl_checkpoint_normalized_rows_nonnegative CHECK (normalized_rows >= 0);

-- The orders and ranges of `GET /data` besides `id`: by `updated_at` (newest first, and
-- `updated_since`) and by `value` (either way, and `min_value`/`max_value`). Each is a btree on
-- (column, id): `id` breaks ties, so a page by cursor resumes after the exact row it ended on,
-- and one index serves both directions.
--
-- The indexes are declared on normalized_data, so every partition has them; a partition built
-- apart (the bulk path, V11) gets them before it is swapped in, like its search indexes, since
-- attaching a partition without them would build them under the swap's lock.

CREATE INDEX normalized_data_updated_at_idx ON normalized_data (updated_at, id);
CREATE INDEX normalized_data_value_idx ON normalized_data (value, id);

-- Builds the order index on `p_column` (`updated_at` or `value`) of table `p_table` unless it
-- has one; true when it built one.
CREATE FUNCTION etl_order_index(p_table regclass, p_column text) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    IF p_column NOT IN ('updated_at', 'value') THEN
        RAISE EXCEPTION 'no order index on column %', p_column;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
               JOIN pg_am a ON a.oid = c.relam JOIN pg_attribute t ON t.attrelid = i.indrelid
               WHERE i.indrelid = p_table AND a.amname = 'btree' AND i.indnkeyatts = 2
                 AND t.attnum = i.indkey[0] AND t.attname = p_column) THEN
        RETURN false;
    END IF;
    EXECUTE format('CREATE INDEX ON %s (%I, id)', p_table, p_column);
    RETURN true;
END $$;

-- Every index a served partition has beyond its keys: search and order.
CREATE OR REPLACE FUNCTION etl_index_partition(p_table regclass) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM etl_search_index(p_table, 'name');
    PERFORM etl_search_index(p_table, 'description');
    PERFORM etl_order_index(p_table, 'updated_at');
    PERFORM etl_order_index(p_table, 'value');
END $$;

-- Builds the index on `p_column` (`name` or `description`: search; `updated_at` or `value`:
-- order) of source `p_source`'s version being built, unless it has one (true when it built
-- one): the long part of finishing a build, before the swap. Indexes may be built at once from
-- several sessions.
CREATE OR REPLACE FUNCTION etl_index_build(p_source text, p_column text) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    t regclass := etl_partition_of(p_source, 'build');
BEGIN
    IF t IS NULL THEN
        RETURN false;
    ELSIF p_column IN ('updated_at', 'value') THEN
        RETURN etl_order_index(t, p_column);
    ELSE
        RETURN etl_search_index(t, p_column);
    END IF;
END $$;

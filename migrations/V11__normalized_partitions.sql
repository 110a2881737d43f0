-- Bulk loads: `normalized_data` is partitioned by source, one partition per source, so a large
-- backlog (a first load, a replay, a refresh of most of a source) can be normalized into a new
-- partition without its search indexes, indexed in bulk once complete, and swapped in by one
-- transaction. Maintaining the trigram indexes row by row cost 4 to 5 times the upsert itself;
-- built in bulk they cost about as much as the upsert. Readers see the previous version of the
-- source whole until the swap (see services/normalizer/src/replay.rs).
--
-- What changes for readers: nothing in the columns; ids stay unique (one sequence), but the
-- primary key is (id, source), since a partitioned table's keys must hold its partition key.
-- Its leading `id` serves id order across sources and, within a source's partition, the
-- per-source pages the old (source, id) index served, so that index is gone.

CREATE SEQUENCE normalized_id_seq AS bigint;
SELECT setval('normalized_id_seq', coalesce((SELECT max(id) FROM normalized_data), 0) + 1, false);

ALTER TABLE normalized_data RENAME TO normalized_data_v10;
ALTER INDEX normalized_data_pkey RENAME TO normalized_data_v10_pkey;
ALTER INDEX normalized_data_source_key RENAME TO normalized_data_v10_source_key;
ALTER INDEX normalized_data_source_id_idx RENAME TO normalized_data_v10_source_id_idx;
ALTER INDEX normalized_data_name_trgm_idx RENAME TO normalized_data_v10_name_trgm_idx;
ALTER INDEX normalized_data_description_trgm_idx RENAME TO normalized_data_v10_description_trgm_idx;

CREATE TABLE normalized_data (
    id          bigint           NOT NULL DEFAULT nextval('normalized_id_seq'),
    source      text             NOT NULL,
    source_id   text             NOT NULL,
    name        text             NOT NULL,
    value       double precision NOT NULL,
    description text,
    created_at  timestamptz      NOT NULL DEFAULT now(),
    updated_at  timestamptz      NOT NULL DEFAULT now(),
    CONSTRAINT normalized_data_pkey PRIMARY KEY (id, source),
    CONSTRAINT normalized_data_source_key UNIQUE (source, source_id),
    CONSTRAINT normalized_data_name_nonempty CHECK (name <> ''),
    CONSTRAINT normalized_data_value_finite
        CHECK (value <> 'NaN'::float8 AND value <> 'Infinity'::float8 AND value <> '-Infinity'::float8)
) PARTITION BY LIST (source);
ALTER SEQUENCE normalized_id_seq OWNED BY normalized_data.id;
CREATE INDEX normalized_data_name_trgm_idx ON normalized_data USING gin (name gin_trgm_ops);
CREATE INDEX normalized_data_description_trgm_idx ON normalized_data USING gin (description gin_trgm_ops);

-- Versions being built, one partition per source: the same shape with only its keys (the
-- upsert's conflict target), so rows go in at the speed of a plain table.
CREATE TABLE normalized_build (
    LIKE normalized_data INCLUDING DEFAULTS INCLUDING CONSTRAINTS,
    CONSTRAINT normalized_build_pkey PRIMARY KEY (id, source),
    CONSTRAINT normalized_build_source_key UNIQUE (source, source_id)
) PARTITION BY LIST (source);

-- Which table is each source's served partition (`live`) and its version being built
-- (`build`). Tables are named by a sequence, so a source's name never has to be an identifier.
CREATE SEQUENCE etl_partition_seq AS bigint;
CREATE TABLE etl_partitions (
    source text     NOT NULL,
    role   text     NOT NULL,
    relid  regclass NOT NULL,
    PRIMARY KEY (source, role),
    CONSTRAINT etl_partitions_role_known CHECK (role IN ('live', 'build'))
);

-- Source `p_source`'s table in role `p_role` (`live` or `build`); NULL when it has none.
CREATE FUNCTION etl_partition_of(p_source text, p_role text) RETURNS regclass
LANGUAGE sql STABLE AS $$
    SELECT relid FROM etl_partitions WHERE source = p_source AND role = p_role
$$;

-- The search (GIN) indexes of source `p_source`'s served partition.
CREATE FUNCTION etl_search_indexes(p_source text) RETURNS SETOF regclass
LANGUAGE sql STABLE AS $$
    SELECT i.indexrelid::regclass
    FROM pg_index i
    JOIN pg_class c ON c.oid = i.indexrelid
    JOIN pg_am a ON a.oid = c.relam
    WHERE i.indrelid = etl_partition_of(p_source, 'live') AND a.amname = 'gin'
$$;

-- The functions that change partitions run as their owner (the role that migrates, which owns
-- the tables), with the search path they were made with: a service's role needs no ownership.

-- A new, empty, unattached table shaped for source `p_source`'s partition: its keys, its
-- checks (including `source = p_source`, so attaching it needs no scan) and the search
-- columns' statistics sample (see V10), which partitions do not inherit.
CREATE FUNCTION etl_new_partition_table(p_source text) RETURNS regclass
LANGUAGE plpgsql AS $$
DECLARE
    t text := 'normalized_part_' || nextval('etl_partition_seq');
BEGIN
    EXECUTE format('CREATE TABLE %I (LIKE normalized_data INCLUDING DEFAULTS INCLUDING CONSTRAINTS)', t);
    EXECUTE format('ALTER TABLE %I ADD CONSTRAINT %I CHECK (source = %L),
                        ADD PRIMARY KEY (id, source), ADD UNIQUE (source, source_id),
                        ALTER COLUMN name SET STATISTICS 1000,
                        ALTER COLUMN description SET STATISTICS 1000',
                   t, t || '_source', p_source);
    RETURN t::regclass;
END $$;

-- Builds the search index on column `p_column` (`name` or `description`) of table `p_table`
-- unless it has one; true when it built one. Both are what attaching to normalized_data needs.
CREATE FUNCTION etl_search_index(p_table regclass, p_column text) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    IF p_column NOT IN ('name', 'description') THEN
        RAISE EXCEPTION 'no search index on column %', p_column;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
               JOIN pg_am a ON a.oid = c.relam JOIN pg_attribute t ON t.attrelid = i.indrelid
               WHERE i.indrelid = p_table AND a.amname = 'gin' AND t.attnum = i.indkey[0]
                 AND t.attname = p_column) THEN
        RETURN false;
    END IF;
    EXECUTE format('CREATE INDEX ON %s USING gin (%I gin_trgm_ops)', p_table, p_column);
    RETURN true;
END $$;

CREATE FUNCTION etl_index_partition(p_table regclass) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM etl_search_index(p_table, 'name');
    PERFORM etl_search_index(p_table, 'description');
END $$;

-- Source `p_source` has its served partition (empty when new). Attaching takes only a SHARE
-- UPDATE EXCLUSIVE lock on normalized_data: readers and writers of other sources go on.
CREATE FUNCTION etl_ensure_partition(p_source text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    t regclass;
BEGIN
    IF etl_partition_of(p_source, 'live') IS NOT NULL THEN
        RETURN;
    END IF;
    -- Two normalizers seeing a new source at once: one creates it ("ETL2", 0).
    PERFORM pg_advisory_xact_lock(1163152434, 0);
    IF etl_partition_of(p_source, 'live') IS NOT NULL THEN
        RETURN;
    END IF;
    t := etl_new_partition_table(p_source);
    PERFORM etl_index_partition(t);
    EXECUTE format('ALTER TABLE normalized_data ATTACH PARTITION %s FOR VALUES IN (%L)', t, p_source);
    INSERT INTO etl_partitions (source, role, relid) VALUES (p_source, 'live', t);
END $$;

-- Drops source `p_source`'s version being built, if any, with its rejects; true when there
-- was one.
CREATE FUNCTION etl_drop_build(p_source text) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    t regclass;
BEGIN
    DELETE FROM etl_rejects_replay WHERE source = p_source;
    DELETE FROM etl_partitions WHERE source = p_source AND role = 'build' RETURNING relid INTO t;
    IF t IS NULL THEN
        RETURN false;
    END IF;
    EXECUTE format('DROP TABLE %s', t);
    RETURN true;
END $$;

-- Starts an empty version of source `p_source` to build (dropping one under way).
CREATE FUNCTION etl_begin_build(p_source text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    t regclass;
BEGIN
    PERFORM etl_drop_build(p_source);
    t := etl_new_partition_table(p_source);
    EXECUTE format('ALTER TABLE normalized_build ATTACH PARTITION %s FOR VALUES IN (%L)', t, p_source);
    INSERT INTO etl_partitions (source, role, relid) VALUES (p_source, 'build', t);
END $$;

-- Builds the search index on `p_column` of source `p_source`'s version being built, unless it
-- has one (true when it built one): the long part of finishing a build, before the swap. The
-- two indexes may be built at once from two sessions.
CREATE FUNCTION etl_index_build(p_source text, p_column text) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    t regclass := etl_partition_of(p_source, 'build');
BEGIN
    RETURN t IS NOT NULL AND etl_search_index(t, p_column);
END $$;

-- Refreshes the statistics of source `p_source`'s version being built (so the planner knows
-- it the moment it is served).
CREATE FUNCTION etl_analyze_build(p_source text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    t regclass := etl_partition_of(p_source, 'build');
BEGIN
    EXECUTE format('ANALYZE %s', t);
END $$;

-- The version built becomes the served one, in place of the previous partition. Swapping out
-- a partition takes an ACCESS EXCLUSIVE lock on normalized_data until commit: it waits for
-- running statements and holds new ones for the few milliseconds the swap takes. A source's
-- first version needs no such lock.

CREATE FUNCTION etl_swap_build(p_source text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    built regclass := etl_partition_of(p_source, 'build');
    served regclass := etl_partition_of(p_source, 'live');
BEGIN
    IF built IS NULL THEN
        RAISE EXCEPTION 'source % has no version being built', p_source;
    END IF;
    PERFORM etl_index_partition(built);
    EXECUTE format('ALTER TABLE normalized_build DETACH PARTITION %s', built);
    IF served IS NOT NULL THEN
        EXECUTE format('ALTER TABLE normalized_data DETACH PARTITION %s', served);
        EXECUTE format('DROP TABLE %s', served);
    END IF;
    EXECUTE format('ALTER TABLE normalized_data ATTACH PARTITION %s FOR VALUES IN (%L)', built, p_source);
    DELETE FROM etl_partitions WHERE source = p_source;
    INSERT INTO etl_partitions (source, role, relid) VALUES (p_source, 'live', built);
END $$;

-- The rows of V10's table, one partition per source.
DO $$
DECLARE
    s text;
BEGIN
    FOR s IN SELECT DISTINCT source FROM normalized_data_v10 LOOP
        PERFORM etl_ensure_partition(s);
    END LOOP;
END $$;
INSERT INTO normalized_data SELECT * FROM normalized_data_v10;
DROP TABLE normalized_data_v10;

-- Replays now build into normalized_build.
DROP TABLE normalized_replay;

-- Why a source is being rebuilt: its mapping changed, a replay was asked for, or a backlog
-- large enough that building it apart (indexed in bulk) is faster than row by row.
ALTER TABLE etl_replays ADD COLUMN reason text NOT NULL DEFAULT 'mapping',
    ADD CONSTRAINT etl_replays_reason_known CHECK (reason IN ('mapping', 'requested', 'backlog'));

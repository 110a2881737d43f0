-- Per source: its raw rows and the raw changes the normalizer has not applied yet (those after
-- its checkpoint; all of them before the normalizer's first batch). The one definition of
-- "pending" for readers that only look: /stats, tools and tests. One pass over the raw tables'
-- (source, change_id) index and a hash join with the small checkpoint table.
CREATE VIEW etl_pending AS
SELECT r.source,
       count(*) AS raw_rows,
       count(*) FILTER (WHERE r.change_id > coalesce(c.last_processed_id, 0)) AS pending_changes
FROM (
    SELECT source, change_id FROM raw_api_data
    UNION ALL
    SELECT source, change_id FROM raw_csv_data
) r
LEFT JOIN etl_checkpoint c ON c.source = r.source
GROUP BY r.source;

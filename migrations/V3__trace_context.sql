-- The trace context (W3C `traceparent`) of the ingest batch that last wrote each raw row, so the
-- normalizer batch that reads the row can link its span to the one that caused it, across the
-- queue. NULL when trace export is off. Adding a nullable column rewrites nothing.
ALTER TABLE raw_api_data ADD COLUMN trace_context text;
ALTER TABLE raw_csv_data ADD COLUMN trace_context text;

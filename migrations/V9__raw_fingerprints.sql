-- Cheap re-ingests: each raw row keeps a fingerprint of its data as the ingester sent it (the
-- first 16 bytes of the SHA-256 of the record's JSON text). A run first sends each record's id
-- and fingerprint, and only the records whose fingerprint differs (new, changed, tombstoned)
-- are sent whole, parsed as jsonb and upserted; an unchanged record costs a few dozen bytes.
-- NULL for rows landed before: their next run sends them whole once and fills it in.
ALTER TABLE raw_api_data ADD COLUMN fingerprint bytea;
ALTER TABLE raw_csv_data ADD COLUMN fingerprint bytea;

-- Asynchronous dataset deletion: a dataset is being deleted from the request on (deletion_requested_at set;
-- search and ingestion treat it as gone); a worker removes its objects and rows in pages, holding a lease
-- it renews with every page, so a worker that died is resumed by the next one once the lease has run out.
ALTER TABLE datasets
    ADD COLUMN deletion_requested_at timestamptz,
    ADD COLUMN deletion_progress_at timestamptz,
    ADD COLUMN deletion_lease_until timestamptz,
    ADD COLUMN objects_deleted bigint NOT NULL DEFAULT 0,
    ADD COLUMN rows_deleted bigint NOT NULL DEFAULT 0;
CREATE INDEX datasets_deleting ON datasets (deletion_lease_until) WHERE deletion_requested_at IS NOT NULL;

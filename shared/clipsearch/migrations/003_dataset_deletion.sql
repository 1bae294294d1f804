-- Asynchronous dataset deletion: a dataset is 'deleting' from the request on (search and ingestion treat it
-- as gone); a worker removes its objects and rows in pages, holding a lease it renews with every page, so a
-- worker that died is resumed by the next one once the lease has run out.
ALTER TABLE datasets
    ADD COLUMN status text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'deleting')),
    ADD COLUMN deletion_requested_at timestamptz,
    ADD COLUMN deletion_progress_at timestamptz,
    ADD COLUMN deletion_lease_until timestamptz,
    ADD COLUMN objects_deleted bigint NOT NULL DEFAULT 0,
    ADD COLUMN rows_deleted bigint NOT NULL DEFAULT 0;
CREATE INDEX datasets_deleting ON datasets (deletion_lease_until) WHERE status = 'deleting';

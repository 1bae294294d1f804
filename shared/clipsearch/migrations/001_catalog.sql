-- The catalog: datasets, their immutable FAISS segments, and one row per image version.
CREATE TABLE datasets (
    id            bigserial PRIMARY KEY,
    name          text NOT NULL UNIQUE
                  CONSTRAINT dataset_name_rule CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$'),
    model_id      text NOT NULL,
    index_version bigint NOT NULL DEFAULT 0,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE segments (
    id              text PRIMARY KEY,
    dataset_id      bigint NOT NULL REFERENCES datasets (id) ON DELETE CASCADE,
    object_key      text NOT NULL UNIQUE,
    vector_count    integer NOT NULL CHECK (vector_count >= 0),
    index_type      text NOT NULL,
    created_version bigint NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    retired_at      timestamptz,
    retired_version bigint
);
CREATE INDEX segments_live ON segments (dataset_id) WHERE retired_at IS NULL;

-- images.id is the FAISS vector id. A vector is never updated: new content for a key is a new row,
-- and the row it replaces becomes 'deleted' in the same transaction.
CREATE TABLE images (
    id              bigserial PRIMARY KEY,
    dataset_id      bigint NOT NULL REFERENCES datasets (id) ON DELETE CASCADE,
    bucket          text NOT NULL,
    object_key      text NOT NULL,
    etag            text NOT NULL,
    source_path     text,
    sha256          text,
    byte_size       bigint,
    width           integer,
    height          integer,
    status          text NOT NULL DEFAULT 'pending'
                    CHECK (status IN ('pending', 'indexed', 'failed', 'deleted')),
    failure_reason  text,
    segment_id      text REFERENCES segments (id) ON DELETE SET NULL,
    deleted_version bigint,
    attempts        integer NOT NULL DEFAULT 0,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX images_one_live_per_key ON images (dataset_id, object_key)
    WHERE status IN ('indexed', 'failed');
CREATE UNIQUE INDEX images_one_pending_per_version ON images (dataset_id, object_key, etag)
    WHERE status = 'pending';
CREATE INDEX images_by_status ON images (dataset_id, status);
CREATE INDEX images_by_deleted_version ON images (dataset_id, deleted_version);
CREATE INDEX images_by_segment ON images (segment_id);

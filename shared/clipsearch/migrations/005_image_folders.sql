-- The folder index: per folder and live segment, the packed ids of the images that segment indexed in that folder.
-- A folder filter then reads a few rows instead of one index entry per image: 10,000 of 100,000 ids took 5.3 ms
-- as a key range over images, of which PostgreSQL's per-row work was most (benchmarks/filtered_search.py).
-- A row is written in the transaction that commits its segment (ingest or compaction) and goes with the segment
-- (compaction deletes the rows of the segments it replaces; a dataset's deletion cascades). Its ids are never
-- rewritten when an image is deleted: a deleted id stays until compaction rebuilds the row, and search removes it
-- with the deleted ids it already reads for its snapshot (deleted images whose vectors sit in live segments).
CREATE FUNCTION image_folder(object_key text) RETURNS text
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    -- Everything up to and including the last '/': `datasets/<name>/` for a file at the dataset's root.
    RETURN left(object_key, length(object_key) - strpos(reverse(object_key), '/') + 1);

CREATE TABLE image_folders (
    dataset_id bigint NOT NULL REFERENCES datasets (id) ON DELETE CASCADE,
    folder     text COLLATE "C" NOT NULL,  -- compared as bytes, so a folder prefix is one key range
    segment_id text NOT NULL REFERENCES segments (id) ON DELETE CASCADE,
    ids        bytea NOT NULL,  -- big-endian int64 image ids (int8send), ascending
    PRIMARY KEY (dataset_id, folder, segment_id)
);
CREATE INDEX image_folders_by_segment ON image_folders (segment_id);

INSERT INTO image_folders (dataset_id, folder, segment_id, ids)
SELECT i.dataset_id, image_folder(i.object_key), i.segment_id, string_agg(int8send(i.id), ''::bytea ORDER BY i.id)
FROM images i JOIN segments s ON s.id = i.segment_id
WHERE i.status = 'indexed' AND s.retired_at IS NULL
GROUP BY i.dataset_id, image_folder(i.object_key), i.segment_id;

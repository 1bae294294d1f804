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
-- Uncompressed: pglz halved 10,000 ids (80 KB) but reading them back decompressed took longer than the read itself.
ALTER TABLE image_folders ALTER COLUMN ids SET STORAGE EXTERNAL;
CREATE INDEX image_folders_by_segment ON image_folders (segment_id);

-- The packed ids under a key prefix (`upper`: the least string above every string that starts with it), as rows:
-- the rows of every folder that starts with the prefix (a key range on the folder index), plus, when the prefix ends
-- inside a name (its folder is the first `folder_length` characters), the files of its own folder whose name starts
-- with the rest. Those are read as key ranges on the images' keys between the subfolders the folder rows name
-- (`a/b` reads [a/b, a/b/), [a/b0, a/bc/) and [a/bc0, a/c) when a/b/ and a/bc/ are folders; '0' follows '/'), so a
-- subfolder's images are never read one by one. A function, so its statements are planned once per session, and
-- generically: planning them for each call's values took 0.6-0.7 ms of the server's CPU, more than running them.
CREATE FUNCTION image_ids_under(dataset bigint, prefix text, upper text, folder_length integer)
    RETURNS SETOF bytea LANGUAGE plpgsql STABLE
    SET plan_cache_mode = force_generic_plan
AS $$
BEGIN
    RETURN QUERY SELECT f.ids FROM image_folders f
        WHERE f.dataset_id = dataset AND f.folder >= prefix AND f.folder < upper;
    IF folder_length < length(prefix) THEN
        RETURN QUERY
        WITH children AS (
            SELECT DISTINCT left(f.folder, folder_length + strpos(substr(f.folder, folder_length + 1), '/')) AS child
            FROM image_folders f WHERE f.dataset_id = dataset AND f.folder >= prefix AND f.folder < upper),
        gaps AS (
            SELECT coalesce(lag(left(child, -1) || '0') OVER (ORDER BY child), prefix) AS low, child AS high
            FROM children
            UNION ALL SELECT coalesce(max(left(child, -1) || '0'), prefix), upper FROM children)
        SELECT string_agg(int8send(i.id), ''::bytea) FROM gaps g CROSS JOIN LATERAL (
            SELECT m.id FROM images m WHERE m.dataset_id = dataset AND m.status = 'indexed'
            AND m.object_key COLLATE "C" >= g.low AND m.object_key COLLATE "C" < g.high
            AND strpos(substr(m.object_key, folder_length + 1), '/') = 0) i;
    END IF;
END
$$;

INSERT INTO image_folders (dataset_id, folder, segment_id, ids)
SELECT i.dataset_id, image_folder(i.object_key), i.segment_id, string_agg(int8send(i.id), ''::bytea ORDER BY i.id)
FROM images i JOIN segments s ON s.id = i.segment_id
WHERE i.status = 'indexed' AND s.retired_at IS NULL
GROUP BY i.dataset_id, image_folder(i.object_key), i.segment_id;

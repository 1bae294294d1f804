-- Removals and superseding look rows up by key whatever their status (pending included), under the
-- dataset's row lock: without this index each lookup scans the dataset's rows.
CREATE INDEX images_by_key ON images (dataset_id, object_key);

-- The landing path's load as one SQL statement, for those who schedule SQL instead of the
-- script's loader (`sqlite_to_databricks_uploader.py --load-landed`). It loads every Parquet file
-- the nodes landed for one table, exactly once: COPY INTO keeps a load history per table and skips
-- a file it loaded before, and a landed file name is never reused for other rows. Uploads are
-- atomic, so a file that is visible is whole.
--
-- What it does not do, unlike --load-landed: remove loaded files (SQL cannot), so COPY INTO lists
-- a directory that keeps growing (pair it with a clean-up of files older than a few days); create
-- or widen the table (the first --load-landed run, or README "Tables and types", creates it); wait
-- for a file's manifest.
--
-- Parameters: table_name (catalog.schema.table) and landing_dir (<landing_volume>/<table>, e.g.
-- /Volumes/main/edge/landing/sensor_logs). Run it in a SQL task or the SQL editor with those
-- named parameters. Checked against the emulator with the values in place; not yet run on a
-- real workspace.
COPY INTO IDENTIFIER(:table_name)
FROM :landing_dir
FILEFORMAT = PARQUET
PATTERN = '*/batch-*.parquet'
COPY_OPTIONS ('mergeSchema' = 'true');

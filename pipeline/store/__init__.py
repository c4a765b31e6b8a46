"""Storage of results: folders, Parquet parts, the manifest, readers; imports only the core."""

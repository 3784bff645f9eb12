"""Source layouts -> Parquet shard datasets (each also `lgff prep <name>`)."""

"""Reading inputs and writing outputs: local paths and object stores, Parquet and JSON Lines,
rows to requests, output shards and the output directory."""

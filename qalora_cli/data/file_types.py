"""The local data files the toolkit reads through `datasets`: each suffix and its builder."""

DATA_SUFFIXES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}

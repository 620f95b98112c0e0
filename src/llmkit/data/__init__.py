"""Data engineering: read raw text from files, folders, JSONL, Parquet or the embedded
standard-library corpus (``sources``) and turn it into token shards (``shards``)."""

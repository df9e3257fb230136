"""Data: sources (text, JSONL, Parquet, HF datasets) -> packing -> this rank's batches (loader); token shards,
mixtures, the tokenizer, provenance, document boundaries and MQAR's synthetic sequences."""

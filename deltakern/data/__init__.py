"""Data in and out: image sources and decoding, feature shards, array files, text lists,
crash-safe writes and run directories. Depends on ``deltakern.core`` only."""

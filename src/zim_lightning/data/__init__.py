"""Data pipelines and file formats (webdataset shards, SA-1B, MicroMat-3K); knows nothing of models."""

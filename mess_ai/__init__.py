"""mess-ai: turn folders of music recordings into MERT-v1 embeddings, cached in a crash-safe feature store."""

__version__ = "0.1.0"

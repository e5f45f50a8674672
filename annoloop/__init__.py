"""annoloop core: what the backend, the sync job and the training worker share."""

__version__ = "0.1.0"

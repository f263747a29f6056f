"""regfast's benchmark suite: ``python -m regfast.bench``."""

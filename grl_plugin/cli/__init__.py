"""Command-line tools: ``grl-convert`` (checkpoint conversion) and ``grl-demo``."""

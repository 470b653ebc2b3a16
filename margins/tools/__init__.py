"""Command-line tools: ``python -m margins.tools.<tool> --help``."""

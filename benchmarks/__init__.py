"""Side-by-side cost benchmarks; each module runs as ``python -m benchmarks.<name>``."""

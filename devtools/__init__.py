"""Development-only helpers: model builders for benchmarks and tests. Not part of the Bento."""

"""The benchmarks behind `privatune bench` (docs/benchmarks.md)."""

"""Local simulation: scenario files, data preparation and benchmark scripts."""

"""Tools behind CLI commands: the canary audits, `tune` and the LLM benchmarks."""

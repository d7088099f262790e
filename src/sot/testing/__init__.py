"""Test support shipped with the package: a local OpenAI-compatible upstream for tests and benchmarks."""

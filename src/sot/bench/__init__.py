"""Benchmarks: latency of normal decoding against SoT, measured side by side, and a server load check."""

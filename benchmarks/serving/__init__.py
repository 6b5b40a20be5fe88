"""Serving benchmarks: the HTTP server under load, decode with many resident adapters."""

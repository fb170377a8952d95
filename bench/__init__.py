"""Benchmarks for taskstream: a load generator, scenarios, and a 1-second polling baseline."""

"""Benchmarks: timing, FLOP/byte counts, memory."""

"""Benchmarks (``make bench``): each module prints its figures and writes JSON to var/bench/."""

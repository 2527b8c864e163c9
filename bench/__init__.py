"""Benchmarks of ramp-dispatcher: batch, latency, scale and soak.

Run ``python -m bench [names...] [--quick]`` (or ``./dev bench``); each
benchmark prints its figures as it goes and the command ends with one table.
These are measurements, not timed tests: nothing here fails a build.
"""

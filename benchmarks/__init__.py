"""Side-by-side benchmarks of jacpipe against the torch baselines (``python -m benchmarks``)."""

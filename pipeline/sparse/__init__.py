"""Sparse Jacobians: pattern detection, per-op rules, colouring and compressed evaluation."""

"""Example user jobs (see the README)."""

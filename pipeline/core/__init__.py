"""The vocabulary every layer shares: shapes, kinds, layouts, shard specs, options, errors.

Imports nothing of ours outside ``pipeline.core`` and no heavy library at import time.
"""

"""The vocabulary every layer shares: shapes, kinds, layouts, shard specs, options, errors.

Imports nothing of ours outside ``pipeline.core`` and no heavy library at import time.
"""

#: jacpipe's version (``pipeline.__version__``; recorded in every manifest).
__version__ = "0.1.0"

"""The vocabulary every layer shares: shapes, kinds, layouts, shard specs, options, errors.

Imports nothing of ours outside ``pipeline.core`` and no heavy library at import time.
"""

#: jacpipe's version (``pipeline.__version__``; recorded in every manifest).
__version__ = "0.1.0"

from pipeline.core.errors import JacpipeError as JacpipeError  # noqa: E402
from pipeline.core.errors import ShardFailedError as ShardFailedError  # noqa: E402
from pipeline.core.errors import SparsityError as SparsityError  # noqa: E402
from pipeline.core.kinds import KINDS as KINDS  # noqa: E402
from pipeline.core.kinds import kind_of as kind_of  # noqa: E402
from pipeline.core.kinds import layout_of as layout_of  # noqa: E402
from pipeline.core.options import RunOptions as RunOptions  # noqa: E402
from pipeline.core.shapes import Shapes as Shapes  # noqa: E402
from pipeline.core.shard import ShardInputs as ShardInputs  # noqa: E402
from pipeline.core.shard import ShardResult as ShardResult  # noqa: E402
from pipeline.core.shard import ShardSpec as ShardSpec  # noqa: E402
from pipeline.core.smoothing import Smoothing as Smoothing  # noqa: E402

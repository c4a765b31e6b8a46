"""What a smoothed run estimates: the settings recorded in the manifest and in each shard spec.

The estimator itself is :mod:`pipeline.maths.smoothing`'s; this is the
vocabulary every layer shares (the part schema's extra columns, ``--smooth``).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.core.errors import JacpipeError

if TYPE_CHECKING:
    import numpy as np


ESTIMATORS = ("first", "zeroth", "both")


#: ``--smooth auto``: sigma_j = AUTO_FRACTION * max(1, |x_j|).
AUTO_FRACTION = 1e-2


DEFAULT_SAMPLES = 64


#: Extra columns of a smoothed part, by estimator (``values`` always comes first).
COLUMNS = {
    "first": ("values", "stderr"),
    "zeroth": ("values", "stderr"),
    "both": ("values", "stderr", "zeroth", "zeroth_stderr"),
}


ORDER = {"first": "first-order", "zeroth": "zeroth-order", "both": "first- and zeroth-order"}


@dataclass(frozen=True)
class Smoothing:
    """What a smoothed run estimates (recorded in the manifest as ``smoothing``).

    Args:
        sigma: one scale for every input, ``"auto"`` (``fraction * max(1, |x_j|)``),
            or one scale per flat input (a tuple, e.g. from a ``.npy`` file).
        samples: ``K`` perturbations, an even number (``K / 2`` antithetic pairs).
        seed: seed of the perturbations.
        estimator: ``first``, ``zeroth`` or ``both``.
        fraction: the ``auto`` fraction.
        source: where a per-input sigma came from (a file name), for the record.
    """

    sigma: float | str | tuple[float, ...]
    samples: int = DEFAULT_SAMPLES
    seed: int = 0
    estimator: str = "first"
    fraction: float = AUTO_FRACTION
    source: str | None = None

    @property
    def pairs(self) -> int:
        return self.samples // 2

    @property
    def first(self) -> bool:
        return self.estimator in ("first", "both")

    @property
    def zeroth(self) -> bool:
        return self.estimator in ("zeroth", "both")

    @property
    def columns(self) -> tuple[str, ...]:
        return COLUMNS[self.estimator]

    def with_seed(self, seed: int) -> Smoothing:
        """The same smoothing with another seed (an independent Monte Carlo run)."""
        return dataclasses.replace(self, seed=seed)

    def sigma_vector(self, x: Any) -> np.ndarray:
        """sigma per flat input of ``x`` (float64 numpy ``(n,)``).

        Raises:
            JacpipeError: a per-input sigma of the wrong length.
        """
        import numpy as np

        flat = np.asarray(_numpy(x), dtype=np.float64).reshape(-1)
        if self.sigma == "auto":
            return self.fraction * np.maximum(1.0, np.abs(flat))
        if isinstance(self.sigma, tuple):
            if len(self.sigma) != flat.size:
                raise JacpipeError(
                    f"--smooth {self.source or 'vector'}: {len(self.sigma)} sigmas for "
                    f"{flat.size} inputs; give one per flat input of x"
                )
            return np.asarray(self.sigma, dtype=np.float64)
        return np.full(flat.size, float(self.sigma))

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if isinstance(self.sigma, tuple):
            out["sigma"] = list(self.sigma)
        return out

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Smoothing:
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        if isinstance(kwargs.get("sigma"), list):
            kwargs["sigma"] = tuple(float(s) for s in kwargs["sigma"])
        return cls(**kwargs)


def _numpy(x: Any) -> np.ndarray:
    import numpy as np

    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def parse_smooth(
    smooth: float | str | None, *, samples: int = DEFAULT_SAMPLES, seed: int = 0,
    estimator: str = "first",
) -> Smoothing | None:
    """Read ``--smooth SIGMA|auto|FILE.npy`` and its companions into a :class:`Smoothing`.

    Args:
        smooth: a positive number, ``auto``, a ``.npy`` file of per-input sigmas, or None.
        samples: ``--samples K`` (even, at least 4).
        seed: ``--smooth-seed``.
        estimator: ``--estimator first|zeroth|both``.

    Returns:
        The smoothing, or None when ``smooth`` is None.

    Raises:
        JacpipeError: one line naming the option, what arrived and what is allowed.
    """
    if smooth is None:
        return None
    if estimator not in ESTIMATORS:
        raise JacpipeError(f"--estimator must be first, zeroth or both, got {estimator!r}")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 4 or samples % 2:
        raise JacpipeError(
            f"--samples must be an even number >= 4 (antithetic pairs +w, -w; a standard "
            f"error needs two pairs), got {samples!r}"
        )
    common = {"samples": samples, "seed": int(seed), "estimator": estimator}
    text = str(smooth).strip()
    if text == "auto":
        return Smoothing("auto", **common)
    if text.endswith(".npy"):
        return Smoothing(_sigma_file(text), source=os.path.basename(text), **common)
    try:
        sigma = float(text)
    except ValueError:
        raise JacpipeError(
            f"--smooth must be a positive number, auto, or a .npy file of per-input sigmas, "
            f"got {smooth!r}"
        ) from None
    if not (sigma > 0 and math.isfinite(sigma)):
        raise JacpipeError(f"--smooth must be positive and finite, got {smooth!r}")
    return Smoothing(sigma, **common)


def _sigma_file(path: str) -> tuple[float, ...]:
    import numpy as np

    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise JacpipeError(f"--smooth {path}: cannot read it as a .npy array ({exc})") from None
    flat = np.asarray(arr, dtype=np.float64).reshape(-1)
    if not flat.size or not (np.isfinite(flat).all() and (flat > 0).all()):
        raise JacpipeError(f"--smooth {path}: every sigma must be positive and finite")
    return tuple(float(s) for s in flat)

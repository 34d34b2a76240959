"""The input checks the membership statistics share: arrays of finite floats, probabilities and
bools, each ValueError naming the argument, what it got and what is needed."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

FloatArray = NDArray[np.float64]
BoolArray = NDArray[np.bool_]


def finite_float(x: ArrayLike, name: str, ndim: int | None) -> FloatArray:
    arr = np.asarray(x, dtype=np.float64)
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name}: shape {arr.shape}; need {ndim} dimension(s)")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: has NaN or infinite values")
    return arr


def probabilities(x: ArrayLike, name: str, ndim: int) -> FloatArray:
    arr = finite_float(x, name, ndim)
    if arr.size and (arr.min() < 0.0 or arr.max() > 1.0):
        raise ValueError(f"{name}: values in [{arr.min()}, {arr.max()}]; need probabilities in [0, 1]")
    return arr


def bool_array(x: ArrayLike, name: str) -> BoolArray:
    arr = np.asarray(x)
    if arr.dtype != np.bool_:
        raise ValueError(f"{name}: dtype {arr.dtype}; need bool")
    return arr

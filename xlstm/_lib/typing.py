"""Type aliases of the public signatures.

The array API standard has no common array class: numpy, CuPy, torch, JAX and
array-api-strict arrays each have their own, so an array is annotated as :data:`Array`
(any of them). A parameter or gradient dict maps names to such arrays.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeAlias

__all__ = ["Array", "Params", "Grads"]

#: An array of any supported namespace (numpy, CuPy, torch, JAX, array-api-strict).
Array: TypeAlias = Any
#: A parameter dict, such as ``init_params`` returns: names to arrays.
Params: TypeAlias = Mapping[str, Any]
#: A gradient dict, keyed ``"d" + name``.
Grads: TypeAlias = dict[str, Any]

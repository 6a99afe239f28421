"""Explicit-mesh sharding helpers for the few places that gather small arrays on purpose.

Auto and unsharded arrays carry no sharding in their type; under an Explicit mesh, a reshape
or a contraction across a sharded axis needs its output sharding spelled out, and a solver that
must see a whole leaf (an FFT, a dense eigendecomposition) gathers it and splits the result
again.
"""

import jax
from jax.sharding import PartitionSpec


def explicit_spec(x: jax.Array) -> tuple | None:
  """The mesh axes of each dimension of ``x`` under an Explicit mesh, else None."""
  spec = tuple(getattr(jax.typeof(x).sharding, "spec", ()))
  spec += (None,) * (x.ndim - len(spec))
  return spec if any(axes is not None for axes in spec) else None


def replicated(x: jax.Array) -> jax.Array:
  """``x`` gathered onto every device when it is explicitly sharded, else ``x`` itself."""
  return x if explicit_spec(x) is None else jax.sharding.reshard(x, PartitionSpec())


def sharded_like(x: jax.Array, reference: jax.Array, *, leading_axes: int = 0) -> jax.Array:
  """``x`` split as ``reference`` is, after ``leading_axes`` unsharded axes of its own."""
  spec = explicit_spec(reference)
  if spec is None:
    return x
  return jax.sharding.reshard(x, PartitionSpec(*(None,) * leading_axes, *spec))


def replicated_if_explicit(*leaves: jax.Array) -> PartitionSpec | None:
  """The output sharding of a contraction of ``leaves`` down to a small replicated array.

  Contracting axes sharded over Explicit mesh axes needs the output's sharding spelled out;
  otherwise None leaves it to JAX.
  """
  return PartitionSpec() if any(explicit_spec(leaf) is not None for leaf in leaves) else None

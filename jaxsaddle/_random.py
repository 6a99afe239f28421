"""Keys and cheap isotropic noise over whole parameter pytrees.

Noise-injecting optimizers draw a fresh sample of the size of the model at
every step. ``jax.random.normal`` with the default threefry generator costs
about as much as a whole SGD step of a small MLP on a CPU, so the samplers here
derive standard normals from a keyed counter hash instead:

.. math::

  b_i = h(h(i \\oplus s_0) + s_1), \\quad
  u_i = (2 \\lfloor b_i / 2^9 \\rfloor + 1) / 2^{23} - 1 \\in (-1, 1), \\quad
  z_i = \\sqrt{2} \\, \\mathrm{erf}^{-1}(u_i),

where ``i`` is the element's position in the concatenation of all leaves, the
64-bit seed ``(s_0, s_1)`` is drawn from the typed JAX key with
``jax.random.bits`` (so every key implementation works and ``vmap`` over keys is
exact), and ``h`` is Wellons' ``lowbias32`` avalanche hash. ``z`` is a standard
normal up to the 23-bit quantisation of ``u`` (|z| <= 5.3): with 23 bits every
``u`` is exact in float32 and at most 1 - 2**-23, so ``erf_inv`` never sees 1.
The value at an element depends only on the key and its position, so a sharded
leaf produces the same numbers as an unsharded one without communication, and
a pytree gets the same noise as its flattened vector. Positions are 32-bit: past 2**32
elements in one tree the stream repeats.
"""

import itertools
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxsaddle import _checks

Distribution = Literal["gaussian", "sphere", "ball"]
DISTRIBUTIONS = ("gaussian", "sphere", "ball")


def canonicalize_key(
  key: jax.Array | int,
  *,
  many_seeds: str = "make the call inside jax.vmap over the keys (for a transform: build it there)",
) -> jax.Array:
  """Returns a typed PRNG key from an int seed, a typed key or a raw uint32 key.

  Raises ValueError for a batch of keys or seeds, saying how to run many seeds instead
  (``many_seeds``): a transform holds one key, and many seeds run by building it inside
  ``jax.vmap`` over them.
  """
  typed = isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
  if not typed and (key is None or isinstance(key, (bool, str, bytes)) or not _integer(key)):
    # flax's nnx.Rngs and RngStream hold keys and are called to give one.
    hint = " Call it for a key: rngs() or rngs.params()." if "Rng" in type(key).__name__ else ""
    # Objects such as nnx.Rngs have reprs many lines long.
    shown = repr(key) if "\n" not in repr(key) else f"a {type(key).__name__}"
    raise TypeError(
      "key must be a typed PRNG key (jax.random.key), raw uint32 key data "
      f"(jax.random.PRNGKey) or an int seed, got {shown}.{hint}"
    )
  # Raw key data has a trailing axis; a 0-d uint32 is a seed (vmapped seeds are).
  raw = (
    not typed
    and isinstance(key, (jax.Array, np.ndarray))
    and key.dtype == jnp.uint32
    and key.ndim >= 1
  )
  batch_shape = np.shape(key)[:-1] if raw else np.shape(key)
  if batch_shape:
    raise ValueError(
      f"key must be one key or seed, got a batch of shape {batch_shape}; to run many seeds, "
      f"{many_seeds}."
    )
  if typed:
    return key
  if not raw and not isinstance(key, jax.core.Tracer) and not jax.config.jax_enable_x64:
    seed = int(np.asarray(key))
    if not 0 <= seed < 2**32:
      raise ValueError(
        f"key: without jax_enable_x64 a seed must lie in [0, 2**32), got {seed}: JAX keeps "
        "only its low 32 bits, so 2**32 would give the same key as 0, and -1 as 2**32 - 1. "
        "Use such a seed, or pass jax.random.key(seed) with x64 enabled."
      )
  return jax.random.wrap_key_data(key) if raw else jax.random.key(key)


def _integer(value) -> bool:
  """Whether ``value`` has an integer dtype; False for objects that have no dtype at all."""
  try:
    return jnp.issubdtype(jnp.result_type(value), jnp.integer)
  except TypeError:
    return False


def _lowbias32(x: jax.Array) -> jax.Array:
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def _positions(leaf: jax.Array, offset: int) -> jax.Array:
  """Row-major position of every element of ``leaf`` plus ``offset``, as uint32."""
  sharding = jax.typeof(leaf).sharding
  position = jnp.full(leaf.shape, jnp.uint32(offset % 2**32), dtype=jnp.uint32)
  stride = 1
  for dim in reversed(range(leaf.ndim)):
    iota = jax.lax.broadcasted_iota(jnp.uint32, leaf.shape, dim, out_sharding=sharding)
    position = position + iota * jnp.uint32(stride % 2**32)
    stride *= leaf.shape[dim]
  return position


def uniform_from_bits(bits: jax.Array, dtype) -> jax.Array:
  """Maps uint32 bits to the midpoints of 2**23 equal cells of (-1, 1), exactly in float32."""
  return ((bits >> 9).astype(dtype) * 2 + 1) * 2.0**-23 - 1


def _tree_bits(key: jax.Array, tree):
  """``([(leaf, hash of each element's position)], treedef)``, the hash keyed by ``key``."""
  seed = jax.random.bits(key, (2,), jnp.uint32)
  leaves, treedef = jax.tree.flatten(tree)
  offsets = np.cumsum([0] + [leaf.size for leaf in leaves])[:-1]
  hashed = [
    (leaf, _lowbias32(_lowbias32(_positions(leaf, int(offset)) ^ seed[0]) + seed[1]))
    for leaf, offset in zip(leaves, offsets, strict=True)
  ]
  return hashed, treedef


def tree_standard_normal(key: jax.Array, tree):
  """Standard normal noise shaped, typed and sharded like ``tree``'s leaves.

  Computed in float32 (float64 for float64 leaves) and returned in that
  precision; callers cast to the leaf dtype after scaling.
  """
  hashed, treedef = _tree_bits(key, tree)
  noise = []
  for leaf, bits in hashed:
    uniform = uniform_from_bits(bits, _checks.compute_dtype(leaf.dtype))
    noise.append(math.sqrt(2) * jax.lax.erf_inv(uniform))
  return jax.tree.unflatten(treedef, noise)


def tree_rademacher(key: jax.Array, tree):
  """Independent signs, +1 or -1 with probability 1/2, shaped, typed and sharded like ``tree``.

  The sign is the top bit of the same counter hash as :func:`tree_standard_normal`: one hash
  per element, several times cheaper than ``jax.random.rademacher`` with threefry.
  """
  hashed, treedef = _tree_bits(key, tree)
  signs = [jnp.where((bits >> 31) == 1, 1, -1).astype(leaf.dtype) for leaf, bits in hashed]
  return jax.tree.unflatten(treedef, signs)


def tree_size(tree) -> int:
  """Total number of elements, a static Python int."""
  return sum(leaf.size for leaf in jax.tree.leaves(tree))


def _sum_of_squares(leaves) -> jax.Array:
  squares = [jnp.sum(jnp.square(leaf.astype(_checks.compute_dtype(leaf.dtype)))) for leaf in leaves]
  return sum(squares, jnp.zeros((), jnp.result_type(jnp.float32, *squares)))


def global_norm(tree) -> jax.Array:
  """Euclidean norm of the concatenated leaves, accumulated in float32 or better."""
  return jnp.sqrt(_sum_of_squares(jax.tree.leaves(tree)))


# The leaves read first by norm_at_most hold at most this fraction of the elements.
_FIRST_READ_FRACTION = 1 / 8


def norm_at_most(tree, threshold) -> jax.Array:
  """``global_norm(tree) <= threshold``, reading the whole tree only when it has to.

  The norm of some leaves is a lower bound on the norm of all of them. The smallest leaves,
  together at most an eighth of the elements (biases, scales, small layers), are summed first;
  the rest are read, under ``lax.cond``, only when those alone do not already exceed the
  threshold. Away from saddle points the gradient norm is far above a saddle-escape threshold
  and the first read settles it, so the test costs a fraction of a pass over the gradient.
  Under ``vmap`` the cond is a select and every leaf is read, as with :func:`global_norm`.
  A NaN or Inf anywhere gives False.
  """
  leaves = sorted(jax.tree.leaves(tree), key=lambda leaf: leaf.size)
  cumulative_sizes = list(itertools.accumulate(leaf.size for leaf in leaves))
  num_first = sum(size <= _FIRST_READ_FRACTION * cumulative_sizes[-1] for size in cumulative_sizes)
  if num_first == 0:
    return jnp.sqrt(_sum_of_squares(leaves)) <= threshold
  first = _sum_of_squares(leaves[:num_first])
  # A NaN first sum does not exceed the threshold, so the cond reads on and the total is NaN.
  return jax.lax.cond(
    jnp.sqrt(first) > threshold,
    lambda: jnp.zeros((), bool),
    lambda: jnp.sqrt(first + _sum_of_squares(leaves[num_first:])) <= threshold,
  )


def sample_isotropic(key: jax.Array, tree, radius, distribution: Distribution):
  r"""Isotropic noise over the whole concatenated parameter vector of ``tree``.

  With :math:`z \sim \mathcal N(0, I_d)` over all :math:`d` elements:

  - ``"gaussian"``: :math:`r z / \sqrt d`, so :math:`\mathbb E\|\xi\|^2 = r^2`;
  - ``"sphere"``: :math:`r z / \|z\|`, uniform on the sphere of radius ``r``;
  - ``"ball"``: :math:`r U^{1/d} z / \|z\|` with :math:`U \sim \mathcal U(0, 1)`,
    uniform in the ball of radius ``r``.

  The result has the dtypes of ``tree``'s leaves.
  """
  normal_key, radius_key = jax.random.split(key)
  z = tree_standard_normal(normal_key, tree)
  dim = tree_size(tree)
  if distribution == "gaussian":
    scale = radius / math.sqrt(max(dim, 1))
  else:
    scale = radius / global_norm(z)
    if distribution == "ball":
      # float32 like z: the default dtype would make the same key draw another radius with
      # jax_enable_x64.
      scale = scale * jax.random.uniform(radius_key, dtype=jnp.float32) ** (1.0 / max(dim, 1))
  # The barrier stops XLA from reassociating scale * z (e.g. into z * rsqrt(.)) differently
  # with and without vmap, which would make a vmapped run differ from a loop in the last bit.
  scale = jax.lax.optimization_barrier(jnp.asarray(scale))
  return jax.tree.map(lambda n, leaf: (scale * n).astype(leaf.dtype), z, tree)

"""Host-side views of device results for the multi-device checks.

The checks also run as several processes that share one mesh (``tests/_multihost.py``), where a
sharded result is not all in any one process: it is gathered first, with a collective every
process takes in the same order, as they run the same checks.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils


def local_device() -> jax.Device:
  """A device of this process, where the checks compute their single-device references."""
  return jax.local_devices()[0]


def to_numpy(tree):
  """``tree`` with every leaf a NumPy array holding its whole value; PRNG keys as key data."""

  def convert(leaf):
    if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
    return np.asarray(leaf)

  return jax.tree.map(convert, tree)

"""What the backend makes a branch or a loop cost, for the code that chooses a form by it."""

import jax


def branches_wait_on_host() -> bool:
  """Whether a ``lax.cond`` or a loop iteration stops the device until the host has its predicate.

  On GPUs XLA copies each predicate to the host and waits for it before launching the branch or
  the next iteration: a round trip of 50-90 µs on an H100, longer than a small model's step.
  """
  return jax.default_backend() == "gpu"


def loops_slow_down_convolutions() -> bool:
  """Whether XLA runs a convolution's products far slower inside a loop body than in
  straight-line code: on the CPU (jax-ml/jax#12868)."""
  return jax.default_backend() == "cpu"

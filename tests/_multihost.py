"""A pytest plugin that makes its process one of several JAX processes sharing one mesh.

``tests/test_sharding.py`` starts the multi-device checks in several pytest processes at once,
each loading this plugin (``-p _multihost``) and each seeing its share of the CPU devices, so
that the checks' meshes span processes as a multi-host run's do. The plugin calls
:func:`jax.distributed.initialize` when pytest configures itself, before it imports the checks
and so before any of them touches a JAX backend, with the coordinator, process count and process
id from the environment variables below. CPU collectives between processes go through gloo.
"""

import os

import jax

COORDINATOR = "JAXSADDLE_COORDINATOR"
NUM_PROCESSES = "JAXSADDLE_NUM_PROCESSES"
PROCESS_ID = "JAXSADDLE_PROCESS_ID"


def pytest_configure(config):
  del config
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  # Shorter than JAX's defaults (300 s and 100 s): a process that fails and leaves must stop the
  # others waiting for it in a collective within a minute, not after five.
  jax.distributed.initialize(
    os.environ[COORDINATOR],
    num_processes=int(os.environ[NUM_PROCESSES]),
    process_id=int(os.environ[PROCESS_ID]),
    initialization_timeout=120,
    heartbeat_timeout_seconds=60,
    shutdown_timeout_seconds=60,
  )

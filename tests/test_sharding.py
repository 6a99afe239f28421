"""Runs the multi-device checks (``tests/*sharding_check.py``) on 8 CPU devices.

JAX fixes the number of CPU devices when its backend starts, which has already happened in this
process, so the checks run in a child pytest process that is given 8 devices from the start.
"""

import os
import pathlib
import re
import subprocess
import sys

import pytest

TESTS_DIR = pathlib.Path(__file__).resolve().parent
NUM_DEVICES = 8
# A guard against a hung child; the checks take well under a minute on an idle 2-core CPU.
TIMEOUT_S = 600


def _child_environment() -> dict:
  env = dict(os.environ)
  other_flags = re.sub(r"--xla_force_host_platform_device_count=\S*", "", env.get("XLA_FLAGS", ""))
  env["XLA_FLAGS"] = f"{other_flags} --xla_force_host_platform_device_count={NUM_DEVICES}".strip()
  env["JAX_PLATFORMS"] = "cpu"
  # Options meant for the parent run (say, xdist's -n) must not leak into the child.
  env.pop("PYTEST_ADDOPTS", None)
  return env


@pytest.mark.parametrize("checks", ["sharding_check.py", "curvature_sharding_check.py"])
def test_sharding_checks_pass_on_8_cpu_devices(checks):
  command = [sys.executable, "-m", "pytest", checks, "-q", "-rfE"]
  command += ["-p", "no:cacheprovider"]
  result = subprocess.run(
    command,
    cwd=TESTS_DIR,
    env=_child_environment(),
    capture_output=True,
    text=True,
    timeout=TIMEOUT_S,
  )
  output = f"{result.stdout}\n{result.stderr}"
  if result.returncode != 0:
    pytest.fail(f"{' '.join(command)} exited with {result.returncode}:\n{output}", pytrace=False)
  summary = result.stdout.strip().splitlines()[-1]
  assert re.search(r"\d+ passed", summary), output
  assert "skipped" not in summary, output

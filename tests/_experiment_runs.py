"""Runs ``python -m experiments`` in a subprocess, as a user runs it, for the experiment tests.

:func:`shared_quick_run` computes an experiment's ``--quick`` run once per test
session; under pytest-xdist the workers share it through a lock file.
:func:`assert_resume_recomputes_only` checks ``--resume`` on a copy of it.
"""

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from matplotlib import image

REPO_ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_experiments(*args: str, expect_success: bool = True) -> subprocess.CompletedProcess:
  result = subprocess.run(
    [sys.executable, "-m", "experiments", *args],
    cwd=REPO_ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  if expect_success:
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
  return result


def shared_quick_run(experiment: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
  """The directory of one ``experiment --quick`` run, computed once per test session."""
  if os.environ.get("PYTEST_XDIST_WORKER") is None:
    path = tmp_path_factory.mktemp(experiment) / "quick"
    run_experiments(experiment, "--quick", "--out", str(path))
    return path
  # Every xdist worker's basetemp is a child of the session's own directory.
  shared = tmp_path_factory.getbasetemp().parent
  path = shared / f"{experiment}-quick"
  with open(shared / f"{experiment}-quick.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (path / "summary.md").exists():
      with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(path)
      run_experiments(experiment, "--quick", "--out", str(path))
  return path


def read_metrics(run_dir: Path) -> list[dict]:
  return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def closing_records(records: list[dict]) -> dict[str, dict]:
  """Each finished unit's closing record, by unit name."""
  return {r["unit"]: r for r in records if r.get("kind") == "unit"}


# Fields that hold when or how fast a unit was computed, which a recomputation changes.
TIMING_FIELDS = ("session", "finished", "seconds", "wall_time", "seconds_per_call")


def without_timings(records: list[dict]) -> list[dict]:
  return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in records]


def assert_resume_recomputes_only(
  experiment: str, quick_run: Path, tmp_path: Path, unit: str, timing_prefix: str | None = None
):
  """Resumes a copy of ``quick_run`` killed while it computed ``unit``; checks what was redone.

  The copy loses ``unit``'s records but a first line cut short, and its summary
  and figures. Resuming must compute ``unit`` alone, keep every other line
  byte for byte (their closing records still carry the original session), give
  ``unit`` the numbers it had, and write the same summary and figures again, but for
  the summary's lines that start with ``timing_prefix`` (measured speeds).
  """
  run_dir = tmp_path / "resumed"
  shutil.copytree(quick_run, run_dir)
  lines = (run_dir / "metrics.jsonl").read_text().splitlines()
  kept = [line for line in lines if json.loads(line)["unit"] != unit]
  dropped = [line for line in lines if json.loads(line)["unit"] == unit]
  assert dropped and json.loads(dropped[-1]).get("kind") == "unit"
  cut = dropped[0][: len(dropped[0]) // 2]
  (run_dir / "metrics.jsonl").write_text("\n".join([*kept, cut]) + "\n")
  (run_dir / "summary.md").unlink()
  shutil.rmtree(run_dir / "figures")

  result = run_experiments(experiment, "--resume", str(run_dir))
  assert f"computed 1 unit(s): {unit}\n" in result.stdout

  resumed = (run_dir / "metrics.jsonl").read_text().splitlines()
  assert resumed[: len(kept)] == kept
  recomputed = [json.loads(line) for line in resumed[len(kept) :]]
  original = [json.loads(line) for line in dropped]
  assert recomputed[-1]["session"] != original[-1]["session"]
  assert without_timings(recomputed) == without_timings(original)

  def untimed_summary(directory: Path) -> list[str]:
    lines = (directory / "summary.md").read_text().splitlines()
    return [line for line in lines if not (timing_prefix and line.startswith(timing_prefix))]

  assert untimed_summary(run_dir) == untimed_summary(quick_run)
  figures = sorted(path.name for path in (quick_run / "figures").iterdir())
  assert figures and sorted(path.name for path in (run_dir / "figures").iterdir()) == figures


def assert_is_figure(png: Path, *, taller_than: int, wider_than: int) -> None:
  """``png`` is a PNG image larger than the given pixel sizes, and not a blank canvas."""
  assert png.read_bytes()[:8] == PNG_SIGNATURE
  pixels = image.imread(png)
  assert pixels.shape[0] > taller_than and pixels.shape[1] > wider_than
  assert pixels[..., :3].std() > 0.05

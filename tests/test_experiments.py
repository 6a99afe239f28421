"""The experiment runner and the escape demo, end to end: ``python -m experiments escape --quick``.

The experiment runs in a subprocess, as a user runs it. The quick run is shared
by the tests of this module; under pytest-xdist the workers share it through a
lock file, so it is computed once per session.
"""

import dataclasses
import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _experiment_runs import assert_is_figure
from _experiment_runs import closing_records
from _experiment_runs import read_metrics
from _experiment_runs import run_experiments
from _experiment_runs import shared_quick_run

from experiments import __main__ as experiments_main
from experiments import _runner
from experiments import escape
from experiments import escape_toy

PROBLEMS = ("quadratic", "mlp")
METHODS = ("gd", "pgd", "noisy_gd", "perturbed_sgd")
NOISE_METHODS = ("pgd", "noisy_gd", "perturbed_sgd")
# Each problem's saddle is checked once (gradient, Hessian), in a unit of its own.
UNITS = tuple(f"{p}/{m}" for p in PROBLEMS for m in ("saddle_check", *METHODS))
METHOD_UNITS = tuple(f"{p}/{m}" for p in PROBLEMS for m in METHODS)


@pytest.fixture(scope="session", name="quick_run")
def _quick_run(tmp_path_factory) -> Path:
  return shared_quick_run("escape", tmp_path_factory)


def step_losses(records: list[dict], unit: str) -> np.ndarray:
  """The ``(seeds, steps + 1)`` losses of one unit."""
  rows = sorted((r["step"], r["loss"]) for r in records if r["unit"] == unit and "step" in r)
  assert [step for step, _ in rows] == list(range(len(rows)))
  return np.asarray([loss for _, loss in rows]).T


def test_quick_run_writes_config_metrics_figures_and_summary(quick_run):
  config = json.loads((quick_run / "config.json").read_text())
  assert config["experiment"] == "escape"
  assert config["config"]["seeds"] == 4 and config["config"]["steps"] == 150
  # A quick run compiles without XLA's optimisations, and says so.
  assert config["config"]["fast_compile"]
  assert set(_runner.FAST_COMPILE_XLA_FLAGS) <= set(config["environment"]["xla_flags"].split())
  assert config["config"]["pgd_perturbation_radius"] > 0

  records = read_metrics(quick_run)
  closing = closing_records(records)
  assert sorted(closing) == sorted(UNITS)
  for unit in METHOD_UNITS:
    assert step_losses(records, unit).shape == (4, 151)

  for problem in PROBLEMS:
    assert_is_figure(quick_run / "figures" / f"{problem}.png", taller_than=200, wider_than=300)

  summary = (quick_run / "summary.md").read_text()
  assert "| method | problem | seeds escaped | median escape step |" in summary
  for problem in PROBLEMS:
    assert f"| gd | {problem} | 0/4 | never |" in summary
    assert f"| pgd | {problem} | 4/4 |" in summary
    assert f"figures/{problem}.png" in summary


def test_the_start_is_a_critical_point_that_is_not_a_minimum(quick_run):
  closing = closing_records(read_metrics(quick_run))
  quadratic, mlp = closing["quadratic/saddle_check"], closing["mlp/saddle_check"]
  assert quadratic["gradient_norm"] == 0.0 and mlp["gradient_norm"] == 0.0
  assert quadratic["hessian_min"] == pytest.approx(-1.0, rel=1e-5)
  assert quadratic["num_negative"] == 3 and quadratic["classification"] == "strict saddle"
  # Two hidden layers: the output is cubic in the weights near zero, so the Hessian vanishes
  # and the loss goes down on one side of the saddle and up on the other.
  assert mlp["hessian_min"] == mlp["hessian_max"] == 0.0
  assert mlp["probes"][0] * mlp["probes"][1] < 0
  assert mlp["classification"].startswith("degenerate saddle")


def test_gd_stays_at_the_saddle_and_every_noisy_method_escapes(quick_run):
  records = read_metrics(quick_run)
  closing = closing_records(records)
  for problem in PROBLEMS:
    gd = closing[f"{problem}/gd"]
    assert gd["escape_step"] == [None] * 4
    # The gradient at the start is exactly zero, so GD never moves at all.
    np.testing.assert_array_equal(step_losses(records, f"{problem}/gd"), gd["saddle_value"])
    assert closing[f"{problem}/pgd"]["escaped_fraction"] == 1.0
    assert closing[f"{problem}/pgd"]["num_perturbations"] == [1] * 4  # the jump at step 0
    for method in NOISE_METHODS:
      unit = closing[f"{problem}/{method}"]
      losses = step_losses(records, f"{problem}/{method}")
      # The recorded escape steps are the first steps below the escape level.
      below = losses < unit["escape_level"]
      assert below.any(axis=1).all(), (problem, method)
      assert unit["escape_step"] == np.argmax(below, axis=1).tolist()
      assert unit["median_escape_step"] == np.median(unit["escape_step"])
      assert unit["saddle_value"] - unit["escape_level"] == pytest.approx(1e-2)
      assert np.median(losses[:, -1]) < unit["saddle_value"] - 0.1


def test_resume_recomputes_only_the_missing_unit(quick_run, tmp_path):
  run_dir = tmp_path / "run"
  shutil.copytree(quick_run, run_dir)
  original = read_metrics(quick_run)
  missing = "mlp/pgd"
  kept_lines = [
    line
    for line in (run_dir / "metrics.jsonl").read_text().splitlines()
    if json.loads(line)["unit"] != missing
  ]
  # A run killed while writing mlp/pgd: a few of its step lines, the last one cut short.
  partial = [json.dumps(r) for r in original if r["unit"] == missing][:3]
  partial[-1] = partial[-1][: len(partial[-1]) // 2]
  (run_dir / "metrics.jsonl").write_text("\n".join(kept_lines + partial) + "\n")
  # The summary and figure are written again, not kept from the copy.
  (run_dir / "summary.md").unlink()
  (run_dir / "figures" / "mlp.png").unlink()

  result = run_experiments("escape", "--resume", str(run_dir))
  assert f"computed 1 unit(s): {missing}\n" in result.stdout

  resumed = read_metrics(run_dir)
  before, after = closing_records(original), closing_records(resumed)
  assert sorted(after) == sorted(before)
  assert after[missing]["session"] != before[missing]["session"]
  for unit in METHOD_UNITS:
    assert len([r for r in resumed if r["unit"] == unit]) == 151 + 1  # steps and closing record
  for unit in set(UNITS) - {missing}:
    assert after[unit] == before[unit]
  # Same keys, same program: the recomputed unit reproduces the original run exactly.
  np.testing.assert_array_equal(step_losses(resumed, missing), step_losses(original, missing))
  assert_is_figure(run_dir / "figures" / "mlp.png", taller_than=200, wider_than=300)
  # Rewritten from the records (its timing columns differ from run to run).
  summary, original_summary = ((d / "summary.md").read_text() for d in (run_dir, quick_run))
  assert summary.splitlines()[0] == original_summary.splitlines()[0]
  assert len(summary.splitlines()) == len(original_summary.splitlines())


def test_cli_refuses_to_overwrite_a_run_or_to_change_a_resumed_config(quick_run):
  overwrite = run_experiments("escape", "--quick", "--out", str(quick_run), expect_success=False)
  assert overwrite.returncode != 0 and "--resume" in overwrite.stderr
  changed = run_experiments(
    "escape", "--resume", str(quick_run), "--seeds", "2", expect_success=False
  )
  assert changed.returncode != 0 and "config.json" in changed.stderr


def test_cli_refuses_a_bad_config_before_writing_anything(tmp_path):
  # A refused config used to leave a run directory that --resume could never finish.
  out = tmp_path / "run"
  refused = run_experiments(
    "pgd-networks", "--quick", "--steps", "3", "--out", str(out), expect_success=False
  )
  assert refused.returncode != 0 and "multiple of log_every (25)" in refused.stderr
  assert "Traceback" not in refused.stderr and not out.exists()
  (tmp_path / "file").touch()
  on_a_file = run_experiments(
    "escape", "--quick", "--out", str(tmp_path / "file"), expect_success=False
  )
  assert on_a_file.returncode != 0 and "is a file" in on_a_file.stderr


def test_fast_compile_refuses_to_pretend_once_the_backend_has_started(monkeypatch):
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  jax.devices()  # starts the backend, which has read XLA_FLAGS for good
  _runner.use_compiler_settings(escape.Config())  # nothing to apply
  with pytest.raises(RuntimeError, match="before JAX starts its backend"):
    _runner.use_compiler_settings(dataclasses.replace(escape.Config(), fast_compile=True))


def test_the_hanging_cpu_scheduler_is_turned_off_before_jax_starts_and_left_alone_after(
  monkeypatch, tmp_path
):
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_max_isa=AVX2")
  monkeypatch.setattr(_runner.xla_bridge, "backends_are_initialized", lambda: False)
  for _ in range(2):  # a second call adds nothing
    _runner.avoid_cpu_scheduler_hang()
    assert os.environ["XLA_FLAGS"].split() == [
      "--xla_cpu_max_isa=AVX2",
      *_runner.CPU_SCHEDULER_XLA_FLAGS,
    ]
  # Once the backend has started XLA has read its flags: editing them would pretend.
  monkeypatch.setenv("XLA_FLAGS", "")
  monkeypatch.setattr(_runner.xla_bridge, "backends_are_initialized", lambda: True)
  _runner.avoid_cpu_scheduler_hang()
  assert os.environ["XLA_FLAGS"] == ""
  # The command line applies it before anything else, a refused run included.
  calls = []
  monkeypatch.setattr(_runner, "avoid_cpu_scheduler_hang", lambda: calls.append(True))
  with pytest.raises(SystemExit, match="error"):
    experiments_main.main(["escape", "--resume", str(tmp_path / "missing")])
  assert calls == [True]


def test_fast_compile_options_only_on_the_cpu_backend(monkeypatch):
  # The CPU backend compiles with them; a GPU's compiler rejects the xla_cpu_ option.
  compiled = jax.jit(lambda x: 2 * x, compiler_options=_runner.fast_compile_options())
  assert float(compiled(jnp.float32(1.5))) == 3.0
  assert _runner.fast_compile_options() == _runner.FAST_COMPILE_OPTIONS
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert _runner.fast_compile_options() == {}


@pytest.mark.parametrize("module", [escape, escape_toy], ids=["escape", "escape-toy"])
@pytest.mark.parametrize("field", ["problems", "methods"])
def test_unknown_problems_and_methods_are_refused_before_any_unit(module, field, tmp_path):
  config = dataclasses.replace(module.Config(), **{field: (*getattr(module.Config(), field), "x")})
  run = _runner.RunDirectory(tmp_path, module.NAME, config)
  with pytest.raises(ValueError, match=rf"unknown {field} \['x'\]"):
    module.run(run)
  assert not run.metrics_path.exists()  # nothing was computed, not even the first unit


def test_interrupted_run_says_how_to_resume(tmp_path, monkeypatch, capsys):
  def interrupted(run_dir):
    raise KeyboardInterrupt

  monkeypatch.setattr(escape, "run", interrupted)
  # Not --quick: its fast_compile would edit this process's XLA_FLAGS.
  out = tmp_path / "run"
  assert experiments_main.main(["escape", "--out", str(out)]) == 130
  assert f"python -m experiments escape --resume {out}" in capsys.readouterr().err
  assert (out / "config.json").exists()  # what the resume reads is kept

"""bench.gpu_check on a CPU: the dry run (tiny Llama, 3 steps) goes through the same code as the GPU run, with
the project's heavy dependencies made unimportable as they are on the GPU machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.gpu_check.cli import main
from bench.gpu_check.timing import Clock

ROOT = Path(__file__).resolve().parents[1]
ABSENT_ON_GPU_MACHINE = ("ray", "mlflow", "sqlalchemy", "alembic", "psycopg", "pandas", "fastapi", "pydantic",
                         "pydantic_settings", "prometheus_client", "matplotlib", "sklearn", "gguf")
"""The project's dependencies beyond torch, transformers, peft and safetensors (pyproject.toml)."""
# A None entry in sys.modules makes `import x` raise ImportError and find_spec("x") return None: the package
# looks not installed, to the bench and to transformers' optional-dependency probes alike.
RUNNER = ("import runpy, sys\n"
          "for name in sys.argv[1].split(','):\n"
          "    sys.modules[name] = None\n"
          "sys.argv = ['bench.gpu_check', *sys.argv[2:]]\n"
          "runpy.run_module('bench.gpu_check', run_name='__main__', alter_sys=True)\n")


@pytest.fixture(scope="module")
def dry_run() -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", RUNNER, ",".join(ABSENT_ON_GPU_MACHINE), "--dry-run", "--device", "cpu",
         "--batch-sizes", "4,8"],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )


def test_dry_run_reports_every_measurement_and_passes_the_correctness_check(dry_run):
    assert dry_run.returncode == 0, dry_run.stderr[-3000:]
    lines = dry_run.stdout.strip().splitlines()
    assert lines[0].startswith("device: cpu")
    report = json.loads(lines[-1])
    assert {"device", "dtype", "versions", "configs", "correctness", "decode", "engine", "time_guard",
            "ratio_meaning", "passed"} <= report.keys()
    assert report["passed"] and report["dry_run"] and report["dtype"] == "float32"

    check = report["correctness"]["tiny"]
    assert check["passed"]
    assert check["kernels"] == {"stacked": "stacked", "compact": "compact", "gathered": "gathered"}
    assert all(err <= check["tolerance"] for err in check["max_abs_err"].values())
    assert check["lora_effect"] > 2 * check["tolerance"]  # the experts matter: a layer ignoring them would fail

    for batch in ("b4", "b8"):
        decode = report["decode"]["tiny"][batch]
        assert set(decode["ratios"]) == {"multi4_vs_bare", "multi32_vs_bare", "multi4_vs_peft4"}
        assert all(r > 0 for r in decode["ratios"].values())
        assert set(decode["median_step_ms"]) == {"bare", "multi4", "multi32", "peft4"}
        assert decode["kernels"] == {"multi4": "stacked", "multi32": "compact"}
        engine = report["engine"]["tiny"][batch]
        assert set(engine["ratios"]) == {"multi4_vs_bare", "multi32_vs_bare"}
        assert all(t > 0 for t in engine["decode_tokens_per_s"].values())
    assert report["time_guard"] == {"budget_s": 300, "hit": False, "skipped": [], "truncated": []}


@pytest.mark.parametrize(("argv", "named"), [
    (["--sizes", "135m,2b"], "'2b'"), (["--batch-sizes", "16,sixty"], "'sixty'"), (["--steps", "0"], "'0'"),
    (["--device", "tpu"], "'tpu'"),
])
def test_unknown_option_values_are_refused_by_name(argv, named, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and named in err  # one line that names the bad value


def test_time_guard_skips_what_no_longer_fits():
    clock = Clock(budget_s=0)
    assert not clock.allows("1b/decode/b64")
    assert clock.skipped == ["1b/decode/b64"]

"""The demo as a new user runs it, and what importing lpot_ray pulls in."""

import os
import subprocess
import sys

import pytest


def run_python(*args, **kwargs):
    env = {**os.environ, "RAY_ADDRESS": "", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=600, **kwargs)


def test_demo_tunes_a_real_model_on_a_private_ray(tmp_path):
    done = run_python("-m", "lpot_ray.demo", "--workspace", str(tmp_path / "demo"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "int8 accuracy" in done.stdout and "fp32/int8 =" in done.stdout
    assert (tmp_path / "demo" / "history.db").is_file()
    assert (tmp_path / "demo" / "int8_model" / "model.pt2").is_file()


def test_import_lpot_ray_imports_no_framework():
    code = "import sys, lpot_ray; print(sorted(m for m in ('torch', 'tensorflow', 'mxnet', 'ray') if m in sys.modules))"
    assert run_python("-c", code).stdout.strip() == "[]"


@pytest.mark.parametrize("framework, module, extra", [
    ("pytorch", "torch", "torch"), ("tensorflow", "tensorflow", "tensorflow"), ("mxnet", "mxnet", "mxnet")])
def test_missing_framework_names_the_extra_to_install(framework, module, extra):
    code = (
        f"import sys; sys.modules[{module!r}] = None\n"
        "import lpot_ray\n"
        "from lpot_ray import registry\n"
        f"try:\n    registry.adaptors.get({framework!r})()\n"
        "except lpot_ray.MissingFrameworkError as error:\n    print(error)\n"
    )
    expected = f"framework {framework!r} is not installed: pip install 'lpot_ray[{extra}]'"
    assert run_python("-c", code).stdout.strip() == expected

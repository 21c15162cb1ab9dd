"""The top-level code folders install under `specdec`; from a checkout's root they must not hide
packages of the same bare name. transformers>=5.25 imports Hugging Face's `kernels` package, and
`python -m` / `python -c` run in the checkout put its root (and so our `kernels/`) first on sys.path."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(code: str, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_bare_kernels_from_the_checkout_root_is_the_installed_package(tmp_path):
    pkg = tmp_path / "kernels"
    (pkg / "_internals").mkdir(parents=True)
    (pkg / "__init__.py").write_text("WHO = 'hub'\n")
    (pkg / "_internals" / "__init__.py").write_text("")
    done = _run("import kernels, kernels._internals, specdec.kernels as ours\n"
                "print(kernels.WHO, kernels.__file__, ours.__name__, callable(ours.tree_attention))", tmp_path)
    assert done.returncode == 0, done.stderr
    who, where, ours, ok = done.stdout.split()
    assert who == "hub" and Path(where).resolve() == (pkg / "__init__.py").resolve()
    assert ours == "specdec.kernels" and ok == "True"


def test_bare_kernels_is_missing_when_no_such_package_is_installed(tmp_path):
    done = _run("import importlib.util, sys\n"
                "sys.path[:] = [p for p in sys.path if 'site-packages' not in p or 'specdec' in p]\n"
                "try:\n    import kernels\nexcept ModuleNotFoundError as e:\n    print('missing', e.name)\n"
                "else:\n    print('found', kernels.__file__)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[0] == "missing", done.stdout


def test_modules_with_cuda_tests_import_no_training_stack():
    """The GPU machine has torch, transformers and triton but not hydra, datasets or wandb: a test
    module that holds CUDA tests must import (with its helpers) without them."""
    names = sorted(p.stem for p in (ROOT / "tests").glob("test_*.py") if "cuda.is_available" in p.read_text())
    assert "test_gpu" in names and "test_kernels" in names
    code = ("import sys\nsys.path.insert(0, 'tests')\nimport importlib\n"
            f"for m in {names!r}:\n    importlib.import_module(m)\n"
            "print(sorted({x.split('.')[0] for x in sys.modules} & {'hydra', 'datasets', 'wandb'}))")
    done = _run(code)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]", (names, done.stdout)

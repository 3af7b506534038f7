"""The wheel carries reference/ and backends/ as dsv4_kernels.reference / dsv4_kernels.backends."""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contents_and_install_outside_the_source_tree(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist"), str(ROOT)], check=True, capture_output=True, timeout=600)
    wheel = next((tmp_path / "dist").glob("dsv4_kernels-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("dsv4_kernels/__init__.py", "dsv4_kernels/dispatch.py", "dsv4_kernels/reference/__init__.py",
                   "dsv4_kernels/reference/sigmoid_gate.py", "dsv4_kernels/backends/cuda/__init__.py",
                   "dsv4_kernels/backends/ascend/kernels/sigmoid_gate.py",
                   "dsv4_kernels/kernels/sigmoid_gate/triton.py", "dsv4_kernels/backends/rocm/tuned/README.md"):
        assert needed in names, f"{needed} missing from {wheel.name}"
    assert not any(n.startswith(("tests/", "bench/")) for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "dsv4k = dsv4_kernels.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=600)
    code = ("import dsv4_kernels, dsv4_kernels.reference.sigmoid_gate as r, dsv4_kernels.backends.cuda as c; "
            "print(dsv4_kernels.__file__); print(r.__file__); print(c.__file__)")
    env = {**os.environ, "PYTHONPATH": str(target)}
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(target)!r}); {code}"],
                         capture_output=True, text=True, check=True, cwd=tmp_path, env=env).stdout.split()
    assert all(p.startswith(str(target)) for p in out), out

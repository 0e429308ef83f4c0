"""A built (non-editable) wheel carries the shipped targets and the device runner, and finds them."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_targets_and_runner(tmp_path):
    out = tmp_path / "dist"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                            "-w", str(out), "-q"], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr
    wheel = next(out.glob("ghnq_deploy-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {p.name for p in (ROOT / "ghnq_deploy" / "targets").glob("*.toml")}
    assert {Path(n).name for n in names if n.startswith("ghnq_deploy/targets/")} == shipped
    assert "ghnq_deploy/verify/device_runner.py" in names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = ("import ghnq_deploy.verify.target as t, ghnq_deploy.verify.connection as c; "
             "assert t.SHIPPED_DIR.is_relative_to(%r); assert c.RUNNER.is_file(); "
             "print(' '.join(sorted(t.load_targets())))" % str(site))
    env = {k: v for k, v in os.environ.items() if k != "GHNQ_TARGETS"}
    done = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(site)!r}); {probe}"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert set(done.stdout.split()) == {n.removesuffix(".toml") for n in shipped}

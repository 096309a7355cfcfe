"""Packaging: a non-editable wheel install carries the tuning database's schema, migrations and records.

The slow test builds the wheel from a copy of the sources, installs it into a fresh virtual
environment that borrows this one's site-packages through a ``.pth`` file (so no dependency, torch
above all, is ever downloaded) and runs the console script there.
"""
import os
import re
import shutil
import subprocess
import json
import sys
import venv
from pathlib import Path

import pytest

from graphtune.autotune import db as dbmod

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_listed_in_pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "graphtune").rglob("__init__.py")}
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages in pyproject.toml"
    assert {"graphtune.tuning_db", "graphtune.tuning_db.migrations", "graphtune.tuning_db.records"} <= listed


def test_checkout_finds_tuning_db_at_the_repository_root():
    assert dbmod.TUNING_DB_DIR.resolve() == (ROOT / "tuning_db").resolve()
    assert dbmod.SCHEMA_VERSION >= 1


def _run(cmd, **kw):
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, **kw)
    assert p.returncode == 0, f"{cmd}\nstdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-3000:]}"
    return p


@pytest.mark.slow
def test_wheel_install_has_schema_migrations_and_records(tmp_path):
    pytest.importorskip("setuptools")  # the build backend, used without build isolation (no download)
    # build from a copy: setuptools writes build/ and *.egg-info next to the sources
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("graphtune", "tuning_db"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", dist, src])
    [wheel] = dist.glob("graphtune-*.whl")

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    # dependencies (torch, sqlite-utils...) come from this environment: appended after the wheel's own
    # site-packages, so the installed graphtune wins over the checkout
    ours = [p for p in sys.path if p.endswith("site-packages")]
    (site / "borrowed.pth").write_text("\n".join(ours) + "\n")
    _run([sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "--no-index", "-q", wheel])

    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = _run([py, "-c", "import graphtune, graphtune.autotune.db as d; print(graphtune.__file__); "
                  "print(d.TUNING_DB_DIR); print(d.SCHEMA_VERSION)"], cwd=work, env=env).stdout.split()
    assert where[0].startswith(str(site)), where  # the wheel's graphtune, not the checkout
    assert where[1].startswith(str(site)) and (Path(where[1]) / "migrations").is_dir(), where
    assert int(where[2]) == dbmod.SCHEMA_VERSION

    script = env_dir / "bin" / "graphtune"
    db = work / "t.db"
    n_shipped = sum(len(json.loads(f.read_text())) for f in (ROOT / "tuning_db" / "records").glob("*.json"))
    out = _run([script, "--db", db, "db", "stats"], cwd=work, env=env).stdout
    assert f"records: {n_shipped}" in out
    # the wheel's shipped records are the checkout's, loaded with origin "shipped" and valid (not stale)
    page = work / "report.html"
    _run([script, "--db", db, "report", "-o", page, "--no-plots"], cwd=work, env=env)
    static = re.search(r"<table class='static'>(.*?)</table>", page.read_text(), re.S).group(1)
    n_static_shipped = sum(r["mode"] == "static" for f in (ROOT / "tuning_db" / "records").glob("*.json")
                           for r in json.loads(f.read_text()))
    assert static.count("<td>shipped</td><td>yes</td>") == n_static_shipped > 0
    out = _run([script, "--db", db, "tune", "--shape", "1,2,2,1,64,8", "--budget", "2s,2c", "--quiet"],
               cwd=work, env=env).stdout
    assert "B=1 H=2/2 L=1 S=64 D=8" in out
    out = _run([script, "--db", db, "db", "stats"], cwd=work, env=env).stdout
    assert f"records: {n_shipped + 1}" in out

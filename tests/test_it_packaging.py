"""
pipecomet as a newcomer gets it: a wheel built from a copy of the tree
(nothing is built inside the checkout) and installed into a fresh
virtualenv serves the demo from an empty folder with ``twistd -n
pipecomet`` and with ``pipecomet serve``; an editable install of a copy
gives the twistd plugin and the console script too.  pip may use its
cache; the package registry is reachable.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import urllib.request
import zipfile
from pathlib import Path

import pytest

from .support import ROOT, free_port, serve_process

pytestmark = pytest.mark.timeout(1200)

_IGNORE = shutil.ignore_patterns(".venv", "build", "dist", "*.egg-info", "__pycache__",
                                 "_trial_temp*", ".hypothesis", "dropin.cache", ".git")


def copy_tree(dest: Path) -> Path:
    """
    The project's files, copied to ``dest`` (builds happen there).
    """
    shutil.copytree(ROOT, dest, ignore=_IGNORE)
    return dest


def fresh_venv(where: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", str(where)], check=True, timeout=300)
    return where / "bin"


def pip(bin_dir: Path, *args: str, cwd: Path) -> None:
    done = subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "-q",
                           "--disable-pip-version-check", *args],
                          capture_output=True, text=True, timeout=900, cwd=cwd)
    assert done.returncode == 0, done.stdout + done.stderr


def get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=20) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


HELLO = textwrap.dedent("""
    from pipecomet import App, pipe

    app = App()
    app.route("/hello", [pipe(lambda inp, ctx, res: {"hello": "from cwd"}, name="hello")])
""")


def serves_demo_and_cwd_apps(bin_dir: Path, folder: Path) -> None:
    """
    From an empty ``folder``: the demo and an app from ``folder`` itself,
    by ``twistd -n pipecomet`` and by ``pipecomet serve``.
    """
    assert not any(folder.iterdir())
    commands = {
        "twistd": [str(bin_dir / "twistd"), "-n", "--pidfile=", "pipecomet"],
        "pipecomet": [str(bin_dir / "pipecomet"), "serve"],
    }
    for name, command in commands.items():
        port = free_port()
        with serve_process([*command, "--port", f"tcp:{port}:interface=127.0.0.1"],
                           port, cwd=folder, clean_env=True):
            status, body = get(port, "/api/time.get?app_key=demo-key")
            assert status == 200, (name, body)
            assert "time" in json.loads(body)
            status, body = get(port, "/")
            assert status == 200 and b"/api/time.get" in body
    (folder / "hello.py").write_text(HELLO)
    for name, command in commands.items():
        port = free_port()
        with serve_process([*command, "--app", "hello:app",
                            "--port", f"tcp:{port}:interface=127.0.0.1"],
                           port, cwd=folder, clean_env=True):
            assert get(port, "/hello") == (200, b'{"hello":"from cwd"}'), name
    (folder / "hello.py").unlink()
    for cache in folder.glob("__pycache__"):
        shutil.rmtree(cache)


def test_wheel_in_a_fresh_virtualenv(tmp_path):
    had = {p: (ROOT / p).exists() for p in ("build", "dist")}
    tree = copy_tree(tmp_path / "tree")
    dist = tmp_path / "dist"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                            "--disable-pip-version-check", "-w", str(dist), str(tree)],
                           capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert built.returncode == 0, built.stderr
    wheel, = dist.glob("pipecomet-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    # Every file the package reads at run time is in the wheel.
    data = [p.relative_to(ROOT / "src").as_posix() for p in (ROOT / "src" / "pipecomet").rglob("*")
            if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts]
    assert "pipecomet/demo/demo.toml" in data
    assert [d for d in data if d not in names] == []
    assert "twisted/plugins/pipecomet_plugin.py" in names
    assert "twisted/plugins/__init__.py" not in names and "twisted/__init__.py" not in names
    assert any(n.endswith("entry_points.txt") for n in names)

    bin_dir = fresh_venv(tmp_path / "venv")
    pip(bin_dir, str(wheel), cwd=tmp_path)
    site = Path(subprocess.run([str(bin_dir / "python"), "-c",
                                "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    assert (site / "twisted" / "plugins" / "pipecomet_plugin.py").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    version = subprocess.run([str(bin_dir / "pipecomet"), "--version"], capture_output=True,
                             text=True, timeout=60, cwd=empty)
    assert version.returncode == 0 and version.stdout.startswith("pipecomet ")
    serves_demo_and_cwd_apps(bin_dir, empty)
    # Nothing was built inside the checkout.
    assert {p: (ROOT / p).exists() for p in had} == had


def test_editable_install_of_a_copy(tmp_path):
    tree = copy_tree(tmp_path / "tree")
    bin_dir = fresh_venv(tmp_path / "venv")
    pip(bin_dir, "-e", str(tree), cwd=tmp_path)
    site = Path(subprocess.run([str(bin_dir / "python"), "-c",
                                "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    # No copy or link of the plugin in site-packages: twistd finds it in the tree.
    assert not (site / "twisted" / "plugins" / "pipecomet_plugin.py").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    help_text = subprocess.run([str(bin_dir / "twistd"), "--help"], capture_output=True,
                               text=True, timeout=120, cwd=empty)
    assert "pipecomet" in help_text.stdout
    serves_demo_and_cwd_apps(bin_dir, empty)

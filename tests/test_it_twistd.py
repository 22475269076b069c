"""
The twistd plugin in real subprocesses: the demo served on a real port,
a user's app with --app, bad configuration refused at start, and the
plugin found after a normal (non-editable) install.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

from .support import ROOT, TWISTD, free_port, twistd_server


def get(port, path, headers=None):
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_demo_served_by_twistd():
    with twistd_server() as (port, proc):
        status, headers, body = get(port, "/api/time.get?app_key=demo-key")
        assert status == 200
        assert "time" in json.loads(body)
        status, headers, body = get(port, "/api/time.get?app_key=wrong")
        assert status == 403
        assert json.loads(body)["error"]["code"] == "invalid_app_key"
        status, _, body = get(port, "/no/such/route")
        assert status == 404
        assert json.loads(body)["error"]["code"] == "not_found"
        codes = [get(port, "/api/time.get?app_key=demo-limited")[0] for _ in range(12)]
        assert 429 in codes
        status, _, body = get(port, "/api/search?app_key=demo-key&q=x",
                              {"accept": "application/x-ndjson"})
        names = [json.loads(line)["name"] for line in body.splitlines()]
        assert sorted(names) == ["images", "main", "news", "web"]


def test_user_app(tmp_path):
    (tmp_path / "myapp.py").write_text(textwrap.dedent("""
        from pipecomet import App, pipe

        @pipe
        def hello(inp, ctx, res):
            return {"hello": inp.query.get("name", "world")}

        app = App()
        app.route("/hello", [hello])
    """))
    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    with twistd_server(["--app", "myapp:app"], env=env) as (port, proc):
        status, _, body = get(port, "/hello?name=ann")
        assert (status, json.loads(body)) == (200, {"hello": "ann"})


def run_twistd(*args, timeout=60):
    return subprocess.run([*TWISTD, "-n", "--pidfile=", "pipecomet",
                           "--port", f"tcp:{free_port()}:interface=127.0.0.1", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_bad_config_refused(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[server]\nport = "tcp:0"\nflavour = "strawberry"\n')
    result = run_twistd("--config", str(bad))
    assert result.returncode != 0
    assert "server.flavour" in result.stdout + result.stderr

    bad.write_text("[demo.keys.k]\nrate = 0\n")
    result = run_twistd("--config", str(bad))
    assert result.returncode != 0
    assert "demo.keys.k" in result.stdout + result.stderr


def test_bad_app_refused():
    result = run_twistd("--app", "no_such_module_anywhere:app")
    assert result.returncode != 0
    assert "no_such_module_anywhere" in result.stdout + result.stderr


def test_plugin_found_after_normal_install(tmp_path):
    """
    A non-editable install into a fresh virtualenv puts the plugin in
    site-packages/twisted/plugins (no __init__.py) and twistd lists it.
    """
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    install = subprocess.run([str(py), "-m", "pip", "install", "-q", str(ROOT)],
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    assert (site / "twisted" / "plugins" / "pipecomet_plugin.py").is_file()
    # Twisted's own package is intact (our namespace portion did not shadow it).
    check = subprocess.run([str(py), "-c", "import twisted, twisted.plugins.pipecomet_plugin as p; "
                            "print(twisted.__version__, p.pipecomet.tapname)"],
                           capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert check.returncode == 0, check.stderr
    assert check.stdout.split()[-1] == "pipecomet"
    help_text = subprocess.run([str(venv / "bin" / "twistd"), "--help"], capture_output=True,
                               text=True, timeout=120, cwd=tmp_path)
    assert "pipecomet" in help_text.stdout


def test_options_override_config(tmp_path, monkeypatch):
    """
    --workers-module overrides the config file; the app is built and checked
    (not started) while the options are parsed.
    """
    from pipecomet._service import Options

    (tmp_path / "cpuapp.py").write_text(textwrap.dedent("""
        from pipecomet import App, process_pipe

        def make_app(config=None):
            app = App()
            app.route("/burn", [process_pipe("cpu_burn", lambda i, c, r: 1.0)])
            return app
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    config = tmp_path / "c.toml"
    config.write_text('[workers]\nmodule = "nowhere.at_all"\nsize = 1\n')
    options = Options()
    options.parseOptions(["--config", str(config), "--app", "cpuapp:make_app",
                          "--workers-module", "pipecomet.demo.worker_functions"])
    app = options["app_object"]
    assert app.config.workers.module == "pipecomet.demo.worker_functions"
    assert app.config.workers.size == 1
    assert app.runtime.workers is not None
    assert not app.service.running

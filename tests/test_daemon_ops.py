"""The kvd console script as an operator meets it (issue 12): `--check` names unknown
``KVD_*`` variables, log lines carry a timestamp unless journald adds its own, and a port
in use gives the exit code kvd(8) documents."""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import sys

from kvd.main import configure_logging
from tests.procs import ROOT, free_port


def run_kvd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("KVD_") and k != "JOURNAL_STREAM"}
    clean.update(env or {})
    return subprocess.run([sys.executable, "-m", "kvd.main", *args], cwd=ROOT, env=clean,
                          capture_output=True, text=True, timeout=60)


def exit_codes_in_man_page() -> dict[str, str]:
    """kvd(8)'s EXIT STATUS section: code -> its description."""
    text = (ROOT / "man" / "kvd.8").read_text()
    section = text.split(".SH EXIT STATUS", 1)[1].split(".SH ", 1)[0]
    return {m.group(1): m.group(2) for m in re.finditer(r"\.TP\n\.B (\d+)\n(.*?)(?=\n\.TP|\Z)",
                                                      section, re.S)}


def test_check_warns_about_unknown_kvd_variables():
    proc = run_kvd("--check", env={"KVD_NN": "5", "KVD_N": "3"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "kvd: warning: KVD_NN matches no config key (a typo?); ignored\n"


def test_check_is_silent_without_unknown_variables():
    proc = run_kvd("--check", env={"KVD_N": "3"})
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def test_port_in_use_exits_with_the_code_the_man_page_gives(tmp_path):
    codes = exit_codes_in_man_page()
    in_use = [code for code, text in codes.items() if "port already in use" in text]
    assert len(in_use) == 1, codes
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = run_kvd("--listen", f"127.0.0.1:{port}", "--peer-listen",
                       f"127.0.0.1:{free_port()}", "--data-dir", str(tmp_path / "data"),
                       env={"KVD_METRICS_LISTEN": ""})
    assert proc.returncode == int(in_use[0]), proc.stderr
    assert proc.stderr.splitlines()[-1] == (
        f"kvd: error: listen 127.0.0.1:{port}: Address already in use")
    assert "Traceback" not in proc.stderr


def formatted_line(environ: dict[str, str]) -> str:
    configure_logging("info", environ)
    handler = logging.getLogger().handlers[0]
    record = logging.LogRecord("kvd.server", logging.INFO, __file__, 1, "node %s up", ("n1",),
                               None)
    return handler.format(record)


def test_log_lines_carry_a_timestamp_unless_journald_stamps_them():
    plain = formatted_line({})
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z INFO kvd\.server: node n1 up",
                        plain), plain
    journald = formatted_line({"JOURNAL_STREAM": "8:1234"})
    assert journald == "<6>INFO kvd.server: node n1 up"

"""What commands print when stdout is not a terminal (a pipe, a log file): whole tables, never cut at 80 columns;
progress as plain lines on stderr; and profile.json written with the user's umask, not 0600."""
import io
import os
import stat
import subprocess
import sys

from rich.console import Console

from pernode.measure.profile.profile_schema import load_profile, save_profile
from pernode.measure.profile.profiler import print_profile
from pernode.progress import LineProgress, output_console
from test_measure_profile import synthetic_profile


def run_python(code: str) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter with stdout and stderr piped (neither is a terminal)."""
    env = {**os.environ, "COLUMNS": ""}
    env.pop("COLUMNS")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)


def test_tables_are_whole_when_stdout_is_a_pipe(tmp_path, capsys):
    path = save_profile(tmp_path / "profile.json", synthetic_profile())
    narrow = io.StringIO()
    print_profile(load_profile(path), Console(file=narrow, width=80))
    assert "…" in narrow.getvalue()  # what rich does at 80 columns: the reason for output_console
    assert not sys.stdout.isatty()  # pytest captures stdout: a pipe, as far as the code can tell
    print_profile(load_profile(path))  # the console the commands use
    out = capsys.readouterr().out
    assert out and "…" not in out
    assert "decode: TPOT and throughput vs batch" in out and max(len(line) for line in out.splitlines()) > 80
    assert output_console().width == 1000


def test_progress_prints_lines_when_stdout_is_not_a_terminal():
    r = run_python("from pernode.progress import progress\n"
                   "with progress() as bar:\n"
                   "    task = bar.add_task('quantizing', total=20, info='')\n"
                   "    for i in range(20):\n"
                   "        bar.update(task, advance=1, info=f'layer {i}')\n")
    lines = r.stderr.splitlines()
    assert r.returncode == 0 and r.stdout == ""
    assert lines[0].startswith("quantizing: 2/20 (10%)") and lines[0].endswith("layer 1")
    assert lines[-1].startswith("quantizing: 20/20 (100%)") and len(lines) == 10
    quiet = io.StringIO()
    with LineProgress(stream=quiet, disable=True) as bar:
        bar.advance(bar.add_task("x", total=3), 3)
    assert quiet.getvalue() == ""
    lines = io.StringIO()
    bar = LineProgress(stream=lines)  # started and stopped by hand, as bench serve does
    bar.start()
    task = bar.add_task("bench serve", total=4)
    for _ in range(4):
        bar.advance(task)
    bar.stop()
    assert lines.getvalue().splitlines()[-1].startswith("bench serve: 4/4 (100%)")


def test_profile_json_follows_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = save_profile(tmp_path / "profile.json", synthetic_profile())
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        os.umask(0o077)
        private = save_profile(tmp_path / "private.json", synthetic_profile())
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
    finally:
        os.umask(old)

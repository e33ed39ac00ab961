"""Scheduled runs (``metapeft schedule add | list | remove | run``). Never the real crontab or
launchd: every test runs with a fake ``crontab`` (``METAPEFT_CRONTAB``), a fake ``launchctl``
(``METAPEFT_LAUNCHCTL``) and a temporary HOME."""

from __future__ import annotations

import datetime as dt
import json
import os
import plistlib
import subprocess
import sys
import time

import pytest

from metapeft import schedule
from metapeft.artifacts import file_lock
from metapeft.errors import UserError

FAKE_CRONTAB = """#!/bin/sh
f="$FAKE_CRONTAB_FILE"
echo "crontab $*" >> "$f.calls"
if [ "$1" = "-l" ]; then
  if [ -f "$f" ]; then cat "$f"; else echo "no crontab for $(id -un)" >&2; exit 1; fi
elif [ "$1" = "-" ]; then cat > "$f"; fi
"""
FAKE_LAUNCHCTL = """#!/bin/sh
echo "launchctl $*" >> "$FAKE_LAUNCHCTL_LOG"
"""


@pytest.fixture(autouse=True)
def fake_system(tmp_path, monkeypatch):
    """A fake crontab and launchctl, a temporary HOME and registry, for this process and every
    subprocess it starts."""
    cron, launchctl = tmp_path / "fake-crontab", tmp_path / "fake-launchctl"
    cron.write_text(FAKE_CRONTAB)
    launchctl.write_text(FAKE_LAUNCHCTL)
    cron.chmod(0o755)
    launchctl.chmod(0o755)
    env = {"METAPEFT_CRONTAB": str(cron), "FAKE_CRONTAB_FILE": str(tmp_path / "crontab"),
           "METAPEFT_LAUNCHCTL": str(launchctl),
           "FAKE_LAUNCHCTL_LOG": str(tmp_path / "launchctl.log"),
           "HOME": str(tmp_path / "home"), "METAPEFT_HOME": str(tmp_path / "reg")}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return tmp_path


def cli(*args, env=None, check=None):
    r = subprocess.run([sys.executable, "-m", "metapeft.cli", *map(str, args)],
                       capture_output=True, text=True, timeout=600,
                       env={**os.environ, "COLUMNS": "250", **(env or {})})
    if check is not None:
        assert r.returncode == check, (r.stdout, r.stderr)
    return r


def crontab(tmp) -> list[str]:
    f = tmp / "crontab"
    return f.read_text().splitlines() if f.exists() else []


@pytest.mark.parametrize("text,seconds", [("30d", 30 * 86400), ("12h", 43200), ("2w", 1209600),
                                          ("90m", 5400), (" 5M ", 300)])
def test_parse_every(text, seconds):
    assert schedule.parse_every(text) == seconds


@pytest.mark.parametrize("text", ["", "30", "d", "0d", "1m", "3s", "1.5d", "-2d", "30 days"])
def test_parse_every_refuses(text):
    with pytest.raises(UserError) as e:
        schedule.parse_every(text)
    assert e.value.field == "every"


def test_cron_timing():
    at = dt.datetime(2026, 5, 1, 14, 7)
    assert schedule.cron_timing(30 * 86400, at) == ("7 14 * * *", 86400)
    assert schedule.cron_timing(6 * 3600, at) == ("7 * * * *", 3600)
    assert schedule.cron_timing(45 * 60, at) == ("*/30 * * * *", 1800)
    assert schedule.cron_timing(7 * 60, at) == ("*/6 * * * *", 360)


def test_due():
    spec = {"every_seconds": 30 * 86400, "period_seconds": 86400}
    assert schedule.due(spec, {})
    start = 1_000_000.0
    assert not schedule.due(spec, {"started_ts": start}, start + 29 * 86400)
    # cron wakes it daily at a fixed minute: a start a few seconds late is not pushed back a day
    assert schedule.due(spec, {"started_ts": start + 5}, start + 30 * 86400)
    assert schedule.due(spec, {"started_ts": start}, start + 31 * 86400)


def test_dry_run_changes_nothing(fake_system):
    tmp = fake_system
    (tmp / "crontab").write_text("0 1 * * * echo mine\n")
    r = cli("schedule", "add", "monthly", "--every", "30d", "--dry-run", "--", "meta-train",
            "--data", "synthetic", "--name", "m", check=0)
    assert "would install in crontab" in r.stdout and "# metapeft-schedule monthly" in r.stdout
    assert "schedule run monthly --registry" in r.stdout and "dry run" in r.stdout
    assert crontab(tmp) == ["0 1 * * * echo mine"]
    assert "crontab -" not in (tmp / "crontab.calls").read_text() if (
        tmp / "crontab.calls").exists() else True
    assert not (tmp / "reg" / "schedules").exists()
    r = cli("schedule", "add", "mac", "--every", "12h", "--backend", "launchd", "--dry-run",
            "--", "meta-train", "--name", "m", check=0)
    assert "<key>StartInterval</key>" in r.stdout and "<integer>43200</integer>" in r.stdout
    assert not (tmp / "home" / "Library").exists() and not (tmp / "launchctl.log").exists()


def test_add_list_remove_with_cron(fake_system):
    tmp = fake_system
    (tmp / "crontab").write_text("0 1 * * * echo mine\n")
    cli("schedule", "add", "monthly", "--every", "30d", "--", "meta-train", "--data",
        "synthetic", "--name", "m", check=0)
    lines = crontab(tmp)
    assert lines[0] == "0 1 * * * echo mine" and len(lines) == 2
    line = lines[1]
    assert line.endswith("# metapeft-schedule monthly")
    assert f"{sys.executable} -m metapeft.cli schedule run monthly --registry" in line
    assert f"METAPEFT_HOME={tmp / 'reg'}" in line
    assert f">> {tmp / 'reg' / 'schedules' / 'monthly.log'} 2>&1" in line
    spec = json.loads((tmp / "reg" / "schedules" / "monthly.json").read_text())
    assert spec["command"] == ["meta-train", "--data", "synthetic", "--name", "m"]
    assert spec["every_seconds"] == 30 * 86400 and spec["backend"] == "cron"

    again = cli("schedule", "add", "monthly", "--every", "30d", "--", "meta-train", check=2)
    assert "exists" in again.stderr and "--replace" in again.stderr
    cli("schedule", "add", "monthly", "--every", "2w", "--replace", "--", "meta-train",
        "--name", "m", check=0)
    assert len(crontab(tmp)) == 2 and "2w" not in crontab(tmp)[1]  # replaced, not added
    cli("schedule", "add", "daily", "--every", "1d", "--", "weights", "list", check=0)
    rows = json.loads(cli("schedule", "list", "--json", check=0).stdout)
    assert [(r["name"], r["every"], r["installed"], r["running"]) for r in rows] == [
        ("daily", "1d", True, False), ("monthly", "2w", True, False)]
    assert "monthly" in cli("schedule", "list", check=0).stdout

    dry = cli("schedule", "remove", "monthly", "--dry-run", check=0)
    assert "would remove crontab:" in dry.stdout and len(crontab(tmp)) == 3
    cli("schedule", "remove", "monthly", check=0)
    assert crontab(tmp)[0] == "0 1 * * * echo mine" and len(crontab(tmp)) == 2
    assert not any("monthly" in ln for ln in crontab(tmp))
    assert [r["name"] for r in schedule.list_schedules()] == ["daily"]
    gone = cli("schedule", "remove", "monthly", check=2)
    assert "no schedule named 'monthly'" in gone.stderr and "daily" in gone.stderr


@pytest.mark.parametrize("args,needle", [
    (["x", "--every", "3s", "--", "meta-train"], "--every"),
    (["x", "--every", "1d", "--", "nope"], "not a metapeft command"),
    (["x", "--every", "1d"], "after --"),
    (["x", "--every", "1d", "--", "schedule", "list"], "cannot schedule"),
    (["bad/name", "--every", "1d", "--", "meta-train"], "invalid schedule name"),
    (["x", "--every", "1d", "--backend", "systemd", "--", "meta-train"], "--backend"),
])
def test_add_refuses(fake_system, args, needle):
    r = cli("schedule", "add", *args, check=2)
    assert needle in r.stderr and r.stderr.count("\n") == 1
    assert crontab(fake_system) == []


def test_a_missing_crontab_program_is_one_line(fake_system):
    r = cli("schedule", "add", "x", "--every", "1d", "--", "meta-train",
            env={"METAPEFT_CRONTAB": str(fake_system / "no-such-crontab")}, check=2)
    assert "crontab is not installed" in r.stderr and "--dry-run" in r.stderr


def test_launchd_agent(fake_system):
    tmp = fake_system
    cli("schedule", "add", "mac", "--every", "12h", "--backend", "launchd", "--", "weights",
        "list", check=0)
    plist = tmp / "home" / "Library" / "LaunchAgents" / "io.metapeft.schedule.mac.plist"
    agent = plistlib.loads(plist.read_bytes())
    assert agent["Label"] == "io.metapeft.schedule.mac" and agent["StartInterval"] == 43200
    assert agent["ProgramArguments"][-4:] == ["run", "mac", "--registry", str(tmp / "reg")]
    assert agent["StandardOutPath"] == str(tmp / "reg" / "schedules" / "mac.log")
    assert agent["EnvironmentVariables"]["METAPEFT_HOME"] == str(tmp / "reg")
    assert f"launchctl load -w {plist}" in (tmp / "launchctl.log").read_text()
    assert crontab(tmp) == []
    rows = schedule.list_schedules()
    assert rows[0]["installed"] is True and rows[0]["backend"] == "launchd"
    cli("schedule", "remove", "mac", check=0)
    assert not plist.exists() and f"launchctl unload {plist}" in (tmp / "launchctl.log").read_text()


def test_run_appends_to_the_log_and_waits_until_due(fake_system):
    tmp = fake_system
    cli("schedule", "add", "w", "--every", "1d", "--", "weights", "list", check=0)
    cli("schedule", "run", "w", "--registry", tmp / "reg", check=0)
    log = (tmp / "reg" / "schedules" / "w.log").read_text()
    assert "start: metapeft weights list" in log and "end: exit status 0" in log
    assert "no meta-weights yet" in log  # the command's own output
    state = json.loads((tmp / "reg" / "schedules" / "w.state.json").read_text())
    assert state["exit_status"] == 0 and state["running"] is False
    cli("schedule", "run", "w", check=0)  # not due again for a day: nothing happens
    assert (tmp / "reg" / "schedules" / "w.log").read_text() == log
    cli("schedule", "run", "w", "--force", check=0)
    assert (tmp / "reg" / "schedules" / "w.log").read_text().count("start:") == 2
    # a failing command's status is the run's
    cli("schedule", "add", "bad", "--every", "1d", "--", "weights", "show", "nosuch", check=0)
    r = cli("schedule", "run", "bad", check=2)
    assert "end: exit status 2" in (tmp / "reg" / "schedules" / "bad.log").read_text()
    assert r.stdout == ""
    assert cli("schedule", "run", "nosuch", check=2).stderr.startswith("error:")


def test_runs_never_overlap(fake_system):
    tmp = fake_system
    cli("schedule", "add", "w", "--every", "1d", "--", "weights", "list", check=0)
    lock = tmp / "reg" / "schedules" / "w.lock"
    with file_lock(lock, blocking=False) as held:  # a run in progress holds it
        assert held
        cli("schedule", "run", "w", "--force", check=0)
        assert schedule.list_schedules()[0]["running"] is True
    log = (tmp / "reg" / "schedules" / "w.log").read_text()
    assert "skipped: the previous run is still going" in log and "start:" not in log
    cli("schedule", "run", "w", "--force", check=0)  # released: it runs
    assert "start:" in (tmp / "reg" / "schedules" / "w.log").read_text()


def test_a_run_still_going_makes_the_next_one_skip(fake_system):
    """Two real scheduled runs at once: the second finds the first's lock and skips."""
    tmp = fake_system
    cli("schedule", "add", "slow", "--every", "1d", "--", "meta-train", "--name", "s",
        "--meta-steps", "20", "--ways", "3", "--shots", "2", "--query", "2", "--inner-steps",
        "2", "--meta-batch", "2", "--eval-every", "0", "--no-calibrate-lr", check=0)
    first = subprocess.Popen([sys.executable, "-m", "metapeft.cli", "schedule", "run", "slow"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    state = tmp / "reg" / "schedules" / "slow.state.json"
    deadline = time.time() + 120
    while not (state.exists() and json.loads(state.read_text()).get("running")):
        assert time.time() < deadline and first.poll() is None, first.communicate()
        time.sleep(0.05)
    cli("schedule", "run", "slow", "--force", check=0)
    assert first.wait(timeout=600) == 0, first.communicate()
    log = (tmp / "reg" / "schedules" / "slow.log").read_text()
    assert log.count("start:") == 1 and "skipped: the previous run is still going" in log
    assert "end: exit status 0" in log and log.index("skipped") < log.index("end:")
    assert json.loads(state.read_text())["exit_status"] == 0

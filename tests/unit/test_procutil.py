"""procutil.stop_child: a child started with Popen is stopped with the signal asked for,
SIGKILLed when it outlives the timeout, and reaped either way."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from pgsidecar.procutil import stop_child

# a child that ignores SIGTERM and says so once it does
_STUBBORN = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print('ready', flush=True)\n"
    "time.sleep(60)\n"
)


def test_a_child_that_acts_on_the_signal_is_stopped_by_it_and_reaped() -> None:
    proc = subprocess.Popen(["sleep", "60"])
    stop_child(proc, signal.SIGTERM, timeout=5)
    assert proc.returncode == -signal.SIGTERM


def test_a_child_that_ignores_the_signal_is_killed_after_the_timeout() -> None:
    proc = subprocess.Popen([sys.executable, "-c", _STUBBORN], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    started = time.monotonic()
    stop_child(proc, signal.SIGTERM, timeout=0.3)
    assert proc.returncode == -signal.SIGKILL
    assert time.monotonic() - started >= 0.3
    proc.stdout.close()


def test_a_child_that_has_exited_is_left_alone() -> None:
    proc = subprocess.Popen(["true"])
    proc.wait(timeout=10)
    stop_child(proc, signal.SIGKILL)
    assert proc.returncode == 0

"""No orphans: helper processes end when the `tunery` process that started them dies.

`tunery run` starts long-lived helpers in their own sessions (the DVC worker with the stage it
runs, Prefect's temporary server), so that Ctrl-C reaches `tunery` first and it stops them in
order. A SIGKILL of `tunery` runs no clean-up at all, and those helpers would go on (training at
full CPU, holding DVC's lock). Linux's PR_SET_PDEATHSIG asks the kernel to signal a process when
its parent dies, however it dies; elsewhere this is a no-op and the clean-up paths stay as they
are. No preexec_fn (not safe with threads): each helper asks for the signal itself, first thing.
"""

from __future__ import annotations

import contextlib
import os
import runpy
import signal
import subprocess
import sys
import time
from collections.abc import Callable

PR_SET_PDEATHSIG = 1
PARENT_ENV = "TUNERY_PARENT_PID"  # the pid the helper must outlive not


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Get `sig` when the parent dies; exit now if it already has (it died before we asked)."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: nothing to ask for
        return
    expected = os.environ.get(PARENT_ENV)
    if expected and os.getppid() != int(expected):
        os.kill(os.getpid(), sig)


def kill_group_on(sig: int = signal.SIGTERM) -> None:
    """On `sig`, SIGKILL this process's whole group: the helper and whatever it started."""

    def handler(signum: int, frame: object) -> None:
        os.killpg(os.getpgrp(), signal.SIGKILL)

    signal.signal(sig, handler)


def child_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a guarded helper: the current pid as the parent to watch."""
    return {**(os.environ if environ is None else environ), PARENT_ENV: str(os.getpid())}


STOP_TIMEOUT_S = 10.0


def stop_group(proc: subprocess.Popen, timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM the process group `proc` leads, SIGKILL what is left after `timeout` (a server's
    workers share its group and may outlive it)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=timeout)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def run_in_group(module: str, args: list[str], *, cwd: str, env: dict[str, str]) -> int:
    """`python -m MODULE ARGS` in its own process group until it exits (`run_groups` of one)."""
    return run_groups([(module, args)], cwd=cwd, env=env)


POLL_S = 0.5


def run_groups(
    commands: list[tuple[str, list[str]]],
    *,
    cwd: str,
    env: dict[str, str],
    started: Callable[[], None] | None = None,
) -> int:
    """Each `python -m MODULE ARGS` in its own process group until one of them exits; SIGINT or
    SIGTERM to us stops every group (each server and its workers) before we return, and a SIGKILL
    of us still ends them (PR_SET_PDEATHSIG). `started` runs once all are launched. Returns the
    exit code of the one that ended first; 0 when we stopped them."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tunery.orphans", module, *args],
            cwd=cwd,
            env=child_env(env),
            start_new_session=True,  # a terminal's Ctrl-C reaches us; we stop the groups in order
        )
        for module, args in commands
    ]
    stopped: list[int] = []

    def forward(signum: int, frame: object) -> None:
        stopped.append(signum)
        raise KeyboardInterrupt  # leaves the wait below

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    code = 0
    try:
        if started is not None:
            started()
        code = _first_exit(procs)
    except KeyboardInterrupt:
        code = 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for proc in procs:
            stop_group(proc)
    return 0 if stopped else code


def _first_exit(procs: list[subprocess.Popen]) -> int:
    """Wait until one of `procs` exits; its exit code. Polling, because the standard library has
    no wait-for-any on chosen children that also lets a signal handler interrupt it."""
    while True:
        for proc in procs:
            code = proc.poll()
            if code is not None:
                return code
        time.sleep(POLL_S)


def main() -> None:
    """`python -m tunery.orphans MODULE ARGS...`: run MODULE (e.g. uvicorn) as `python -m` would,
    getting SIGTERM (uvicorn's graceful stop) when the parent dies."""
    die_with_parent()
    module, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()

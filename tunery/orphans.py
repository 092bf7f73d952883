"""No orphans: helper processes end when the `tunery` process that started them dies.

`tunery run` starts long-lived helpers in their own sessions (the DVC worker with the stage it
runs, Prefect's temporary server), so that Ctrl-C reaches `tunery` first and it stops them in
order. A SIGKILL of `tunery` runs no clean-up at all, and those helpers would go on (training at
full CPU, holding DVC's lock). Linux's PR_SET_PDEATHSIG asks the kernel to signal a process when
its parent dies, however it dies; elsewhere this is a no-op and the clean-up paths stay as they
are. No preexec_fn (not safe with threads): each helper asks for the signal itself, first thing.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys

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


def main() -> None:
    """`python -m tunery.orphans MODULE ARGS...`: run MODULE (e.g. uvicorn) as `python -m` would,
    getting SIGTERM (uvicorn's graceful stop) when the parent dies."""
    die_with_parent()
    module, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()

"""A long-lived DVC process: `dvc` commands without paying DVC's start-up on every call.

`tunery run` brings the stages up to date one `dvc repro --single-item` at a time (DVC decides
what is stale). As separate processes, each call spent ~1 s of its ~1.4 s no-op time importing
DVC (measured with cProfile on 2 cores), ~9 s per pipeline run. This worker imports DVC once and
runs each command through DVC's own entry point, `dvc.cli.main`, exactly as the `dvc` executable
does, so DVC's behaviour (locking, staleness, lock file, cache) is unchanged. Not `dvc.api` or
`Repo.reproduce`: those do not print DVC's progress and messages, nor let the stage's own output
reach the caller.

Protocol (one command at a time): the parent writes one JSON line `{"argv": [...], "env": {...}}`
to stdin; everything the command prints (DVC's messages and the stage process's output, which
inherits this process's stdout) comes back on stdout, followed by the line `SENTINEL <exit code>`.
Run it unbuffered (`python -u`) so DVC's messages and the stage's output keep their order.
"""

from __future__ import annotations

import json
import sys

SENTINEL = "\x1etunery-dvc-worker-done"


def _run(argv: list[str], extra_env: dict[str, str]) -> int:
    from dvc.cli import main

    from tunery.env import restored

    try:
        with restored((), extra_env):
            return int(main(argv) or 0)
    except SystemExit as exc:  # argparse errors
        return exc.code if isinstance(exc.code, int) else 1


def serve() -> None:
    from tunery import orphans

    # The worker leads its own process group (the stage runs in it): when `tunery` dies, even by
    # SIGKILL, the worker and the stage it runs end too.
    orphans.die_with_parent()
    orphans.kill_group_on()
    import dvc.cli  # noqa: F401  the import this worker exists to pay once

    print(f"{SENTINEL} ready", flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        try:
            code = _run(list(request["argv"]), dict(request.get("env") or {}))
        except Exception as exc:  # never leave the parent waiting for the sentinel
            print(f"tunery dvc worker: {type(exc).__name__}: {exc}", flush=True)
            code = 255
        sys.stdout.flush()
        sys.stderr.flush()
        print(f"{SENTINEL} {code}", flush=True)


if __name__ == "__main__":
    serve()

"""The `tunery` command."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tunery import __version__, env
from tunery.errors import TuneryError

log = logging.getLogger("tunery")


def _params_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-p",
        "--params",
        default="params.yaml",
        help="params file (default: params.yaml in the project)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one param; YAML value syntax (repeatable)",
    )


def _load(args: argparse.Namespace, root: Path):
    from tunery.config import load_params

    path = Path(args.params)
    return load_params(path if path.is_absolute() or path.exists() else root / path, args.set)


def cmd_check(args: argparse.Namespace, root: Path) -> int:
    params = _load(args, root)
    print(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False).rstrip())
    print(
        f"\nOK: {args.params} is valid"
        + (f" (with {len(args.set)} override(s))" if args.set else "")
    )
    return 0


def tool_env() -> dict[str, str]:
    """This process's environment with the venv's bin first, so `dvc` stages run our `python`."""
    environ = dict(os.environ)
    environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), environ.get("PATH", "")])
    return environ


def dvc(*argv: str, root: Path) -> None:
    exe = shutil.which("dvc", path=tool_env()["PATH"])
    if exe is None:
        raise TuneryError("`dvc` is not installed in this environment; run `make setup`")
    result = subprocess.run([exe, *argv], cwd=root, env=tool_env())
    if result.returncode != 0:
        raise TuneryError(
            f"`dvc {' '.join(argv)}` failed (exit {result.returncode}); see the output above"
        )


def cmd_run(args: argparse.Namespace, root: Path) -> int:
    params = _load(args, root)
    from tunery import tracking

    with tracking.pipeline_run(root, params.tracking.experiment) as run:
        log.info("pipeline run %s (MLflow %s)", run.run_id, tracking.tracking_uri(root))
        repro = ["repro", *(["--force"] if args.force else []), *args.stages]
        dvc(*repro, root=root)
        children = tracking.child_runs(root, params.tracking.experiment, run.run_id)
    ran = ", ".join(c["name"] for c in children) or "none (everything up to date)"
    print(f"\npipeline run {run.run_id}: stages run: {ran}")
    return 0


def cmd_data_add(args: argparse.Namespace, root: Path) -> int:
    from tunery.data.intake import add_file

    params = _load(args, root)
    dest = add_file(Path(args.path), params.ingest, root=root)
    dvc("add", str(dest.relative_to(root)), root=root)
    if args.push:
        dvc("push", root=root)
    print(
        f"added {args.path} as {dest.relative_to(root)}; `tunery run` (or `dvc repro`) ingests it"
    )
    return 0


def cmd_ui(args: argparse.Namespace, root: Path) -> int:
    from tunery.tracking import ARTIFACT_DIR, tracking_uri

    cmd = [
        str(Path(sys.executable).parent / "mlflow"),
        "ui",
        "--backend-store-uri",
        tracking_uri(root),
        "--default-artifact-root",
        str(root / ARTIFACT_DIR),
        "--host",
        args.host,
        "--port",
        str(args.port),
    ]
    print(f"MLflow UI on http://{args.host}:{args.port} (Ctrl-C to stop)")
    return subprocess.call(cmd, cwd=root, env=tool_env())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tunery",
        description="Keep a fine-tuned transformer fresh: versioned data -> pretraining -> PEFT fine-tuning "
        "-> evaluation -> ONNX -> registry. Run inside the project folder (where params.yaml is).",
    )
    parser.add_argument("--version", action="version", version=f"tunery {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("check", help="validate params.yaml (and overrides) and print the result")
    _params_args(p)
    p.set_defaults(fn=cmd_check)

    p = sub.add_parser("run", help="run the pipeline (dvc repro) under one MLflow parent run")
    _params_args(p)
    p.add_argument("stages", nargs="*", help="stages to bring up to date (default: all)")
    p.add_argument(
        "--force", action="store_true", help="re-run stages even if DVC says they are up to date"
    )
    p.set_defaults(fn=cmd_run)

    data = sub.add_parser("data", help="manage the dataset").add_subparsers(
        dest="data_command", required=True, metavar="ACTION"
    )
    p = data.add_parser(
        "add", help="validate a labelled file and append it to the dataset (new data version)"
    )
    p.add_argument("path", help="CSV, JSONL or Parquet file with the configured text/label columns")
    p.add_argument("--push", action="store_true", help="also `dvc push` to the configured remote")
    _params_args(p)
    p.set_defaults(fn=cmd_data_add)

    p = sub.add_parser("ui", help="open the MLflow UI on this project's store")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: localhost only)")
    p.add_argument("--port", type=int, default=5000)
    p.set_defaults(fn=cmd_ui)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from tunery.stage import setup_logging

    setup_logging(args.verbose)
    root = env.configure()
    try:
        sys.exit(args.fn(args, root))
    except TuneryError as exc:
        print(f"tunery: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()

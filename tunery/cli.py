"""The `tunery` command."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

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


def _check_source(params: Any, root: Path) -> str:
    """The configured source can be read and has the configured columns (cheap: headers only)."""
    from tunery.config import FilesSource
    from tunery.data import files
    from tunery.errors import DataValidationError

    src = params.ingest.source
    path = Path(src.path) if Path(src.path).is_absolute() else root / src.path
    if not path.exists():
        raise DataValidationError(
            path, "missing_file", "ingest.source.path does not exist (see README: Your own data)"
        )
    if not isinstance(src, FilesSource):
        return f"source: {src.kind} at {path}"
    found = files.list_files(path, files.LABELLED_SUFFIXES)
    if not found:
        raise DataValidationError(path, "missing_file", "no .csv, .jsonl or .parquet file")
    for file in found:
        files.read_labelled(file, src.text_column, src.label_column, origin="check")
    return f"source: {len(found)} file(s) in {path} with columns {src.text_column!r}, {src.label_column!r}"


def cmd_check(args: argparse.Namespace, root: Path) -> int:
    params = _load(args, root)
    print(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False).rstrip())
    print(_check_source(params, root))
    print(
        f"\nOK: {args.params} is valid"
        + (f" (with {len(args.set)} override(s))" if args.set else "")
    )
    return 0


def cmd_init(args: argparse.Namespace, root: Path) -> int:
    """Create the project's local state once, at set-up: the MLflow store and experiment, and
    Prefect's server database. `tunery run` would create them too, but on a fresh clone that adds
    ~10 s of database migrations to the first run. Safe to repeat (it upgrades, never resets)."""
    from flows.server import init_server_database
    from tunery import tracking
    from tunery.config import load_params

    params = load_params(root / "params.yaml")
    tracking.setup(root, params.tracking.experiment)
    print(
        f"MLflow store ready: {tracking.tracking_uri(root)} (experiment {params.tracking.experiment!r})"
    )
    home = init_server_database()
    print(
        f"Prefect database ready in {home}"
        if home
        else "Prefect: PREFECT_API_URL names a server; nothing to create"
    )
    return 0


def _start_flow_services(root: Path, params) -> Any:
    """Start what a flow needs side by side: Prefect's temporary server (its own process), the
    DVC worker (its own process) and the MLflow store (here). The caller imports its flow module,
    then `server.wait()`s. Sequential, these were ~13 s of start-up on 2 cores before the first
    stage; side by side ~7 s (see flows/server.py). Returns the server (None: one is named)."""
    from flows.server import start_temporary_server
    from tunery import tracking
    from tunery.pipeline import start_dvc_worker

    server = start_temporary_server()
    start_dvc_worker(root)
    tracking.setup(root, params.tracking.experiment)
    return server


def cmd_run(args: argparse.Namespace, root: Path) -> int:
    from tunery.config import load_params
    from tunery.stage import process_start

    params = load_params(root / "params.yaml")  # bad params: a clear error before anything starts
    server = _start_flow_services(root, params)
    from flows.pipeline import pipeline_flow

    if server is not None:
        server.wait()

    result = pipeline_flow(
        project=str(root),
        stages=args.stages or None,
        force=args.force,
        started_at=process_start(),
    )
    ran = (
        ", ".join(r["stage"] for r in result["stages"] if r["ran"])
        or "none (everything up to date)"
    )
    print(f"\npipeline run {result['run_id']}: stages run: {ran}")
    _print_stage_value(root)
    if result.get("registry"):
        print(f"registry: {result['registry']['summary']}")
    t = result["timing"]
    print(
        f"wall {t['wall_seconds']:.0f} s; orchestration + tracking overhead "
        f"{t['overhead_seconds']:.1f} s ({100 * t['overhead_share']:.1f} %)"
    )
    return 0


def cmd_data_add(args: argparse.Namespace, root: Path) -> int:
    from tunery.data.intake import add_file

    params = _load(args, root)
    cfg = params.ingest
    if args.allow_new_labels:
        cfg = cfg.model_copy(update={"allow_new_labels": True})
    dest = add_file(Path(args.path), cfg, root=root)
    from tunery.pipeline import dvc_command

    dvc_command(root, "add", str(dest.relative_to(root)))
    if args.push:
        dvc_command(root, "push")
    print(
        f"added {args.path} as {dest.relative_to(root)}; `tunery run` (or `dvc repro`) ingests it"
    )
    return 0


def cmd_data_withdraw(args: argparse.Namespace, root: Path) -> int:
    from tunery.data.intake import WITHDRAWN_LOG, withdraw
    from tunery.pipeline import dvc_command

    params = _load(args, root)
    record = withdraw(args.name, params.ingest, root=root, reason=args.reason)
    if record["dvc_file"].is_file():
        dvc_command(root, "remove", str(record["dvc_file"].relative_to(root)))
    record["path"].unlink(missing_ok=True)
    print(
        f"withdrew {record['file']} ({record['rows']} rows; it was part of data version "
        f"{record['in_data_version'] or 'none yet'}), recorded in "
        f"{Path(params.ingest.incoming).parent / WITHDRAWN_LOG}; the next `tunery run` or `tunery retrain` "
        "ingests without it (a new data version) and re-trains"
    )
    return 0


def cmd_models(args: argparse.Namespace, root: Path) -> int:
    from tunery import tracking

    params = _load(args, root)
    name = params.registry.model_name
    versions = tracking.list_versions(root, name)
    if not versions:
        print(f"model {name!r} has no registered versions yet (run the pipeline: tunery run)")
        return 0
    print(f"{'version':>7}  {'aliases':<22} {'holdout macro-F1':>16}  {'gate':<9} reason")
    for v in versions:
        f1 = v["metrics"].get("holdout_macro_f1", v["tags"].get("holdout_macro_f1"))
        f1_text = f"{float(f1):.4f}" if f1 not in (None, "") else "-"
        print(
            f"{v['version']:>7}  {','.join(v['aliases']) or '-':<22} {f1_text:>16}  "
            f"{v['tags'].get('gate.decision', '-'):<9} {v['tags'].get('gate.reason', '')}"
        )
    if args.log:
        print("\npromotion log (oldest first):")
        for e in tracking.decisions(root, params.tracking.experiment, name):
            print(
                f"  {e.get('utc', '?')}  {e.get('action'):<15} {e.get('from') or '-':>4} -> {e.get('to') or '-':<4} {e.get('reason', '')}"
            )
    return 0


def cmd_promote(args: argparse.Namespace, root: Path) -> int:
    from tunery import promotion

    record = promotion.promote(root, _load(args, root), args.version, args.reason, force=args.force)
    forced = " (forced past the gate's rejection)" if record.get("forced") else ""
    print(f"champion: version {record['from'] or 'none'} -> {record['to']} ({args.reason}){forced}")
    return 0


def cmd_rollback(args: argparse.Namespace, root: Path) -> int:
    from tunery import promotion

    record = promotion.rollback(root, _load(args, root), args.reason)
    print(f"champion rolled back: version {record['from']} -> {record['to']} ({record['reason']})")
    return 0


def cmd_retrain(args: argparse.Namespace, root: Path) -> int:
    from tunery.config import load_params

    server = _start_flow_services(root, load_params(root / "params.yaml"))
    from flows.retrain import retrain_flow

    if server is not None:
        server.wait()

    result = retrain_flow(project=str(root), ignore_drift=args.ignore_drift)
    if result.get("drift"):
        d = result["drift"]
        print(
            f"drift of the new data vs training: AUC {d['auc']:.3f} "
            f"(0.5 = none), centroid distance {d['centroid_distance']:.4f}"
        )
    if result["status"] != "retrained":
        print(
            f"retrain: {result['status']}"
            + (f" ({result['reason']})" if result.get("reason") else "")
        )
        return 0
    ran = ", ".join(r["stage"] for r in result["stages"] if r["ran"]) or "none"
    print(f"\nretrain: took in {len(result['added'])} file(s); stages run: {ran}")
    newest = result.get("newest") or {}
    if newest.get("rows"):
        print(
            f"newest data ({newest['origins']}, {newest['rows']} test rows): macro-F1 "
            f"{newest['macro_f1']}"
            + (
                f" vs champion {newest['champion_macro_f1']}"
                if "champion_macro_f1" in newest
                else ""
            )
        )
    _print_stage_value(root)
    if result.get("registry"):
        print(f"decision: {result['registry']['summary']}")
    return 0


def _print_stage_value(root: Path) -> None:
    """The evaluate stage's table of what each stage bought (reports/evaluate/stage_value.md)."""
    from tunery import stage_value
    from tunery.config import load_params

    report_dir = root / load_params(root / "params.yaml").evaluate.report_dir
    table = stage_value.read(report_dir)
    if table is not None:
        print(
            f"\n{stage_value.terminal(table)}\n  (table: {report_dir / stage_value.MARKDOWN_FILE})"
        )


def cmd_schedule(args: argparse.Namespace, root: Path) -> int:
    from flows.retrain import serve

    when = f"cron {args.cron!r}" if args.cron else f"every {args.interval:g} s"
    print(f"serving the retrain flow ({when}) with the embedded Prefect server; Ctrl-C stops it.")
    serve(str(root), cron=args.cron, interval=args.interval)
    return 0


def cmd_demo_shard(args: argparse.Namespace, root: Path) -> int:
    from tunery.retrain import release_demo_shard

    dest = release_demo_shard(root, _load(args, root), args.per_class)
    print(f"released {dest.relative_to(root)}; `tunery retrain` takes it in")
    return 0


def cmd_ui(args: argparse.Namespace, root: Path) -> int:
    from tunery.tracking import ARTIFACT_DIR, tracking_uri

    uri = tracking_uri(root)
    if not uri.startswith("sqlite:"):
        # A tracking server already has its UI; starting a local one on its URI would be wrong.
        print(f"MLFLOW_TRACKING_URI points at a tracking server: open {uri} in a browser")
        return 0
    args_ = [
        "ui",
        "--backend-store-uri",
        uri,
        "--default-artifact-root",
        str(root / ARTIFACT_DIR),
        "--host",
        args.host,
        "--port",
        str(args.port),
    ]
    url = f"http://{args.host}:{args.port}"
    print(
        f"MLflow UI on {url} (Ctrl-C to stop). MLflow 3 may open on its GenAI view: switch to "
        "'Model training', open the experiment: Runs (the pipeline, its stages nested), Models "
        "(their LoggedModels); the registry is under Models (README: 'MLflow')."
    )
    from tunery.orphans import run_in_group
    from tunery.pipeline import tool_env

    # Its own process group, signals forwarded: a SIGTERM leaves no server or worker behind.
    return run_in_group("mlflow", args_, cwd=str(root), env=tool_env())


CHAMPION_MODEL = "champion"
MODEL_HELP = (
    "`champion` (default: the registry's champion, a verified local copy), models:/NAME@ALIAS, "
    "models:/NAME/VERSION, or a model folder such as models/deploy (the last run's candidate, "
    "which the gate may have rejected)"
)


def _model_source(model: str, root: Path) -> str:
    """A model URI (`models:/name@alias`) as given; a relative folder against the project root;
    `champion`: the registry champion of this project's `registry.model_name`."""
    if model == CHAMPION_MODEL:
        from tunery import promotion, tracking
        from tunery.config import load_params

        name = load_params(root / "params.yaml").registry.model_name
        if tracking.alias_version(root, name, promotion.CHAMPION) is None:
            raise TuneryError(
                f"model {name!r} has no champion yet: run the pipeline (`tunery run`), or pass "
                "--model models/deploy to use the last run's candidate"
            )
        return f"models:/{name}@{promotion.CHAMPION}"
    if ":/" in model or Path(model).is_absolute() or Path(model).exists():
        return model
    return str(root / model)


def cmd_predict(args: argparse.Namespace, root: Path) -> int:
    from tunery.inference import Predictor, predict_file

    model = _model_source(args.model, root)
    predictor = Predictor(model, device=args.device, batch_size=args.batch_size)
    log.info("model %s: variant %s on %s", model, predictor.metadata["variant"], predictor.provider)
    n = predict_file(
        predictor,
        Path(args.input),
        Path(args.output),
        text_column=args.text_column,
        show_progress=not args.no_progress,
    )
    print(f"scored {n} rows from {args.input} into {args.output} ({predictor.provider})")
    return 0


def cmd_serve_model(args: argparse.Namespace, root: Path) -> int:
    from tunery.inference import Predictor
    from tunery.serve import serve

    model = _model_source(args.model, root)
    predictor = Predictor(model, device=args.device, batch_size=args.batch_size)
    serve(predictor, host=args.host, port=args.port, max_batch=args.max_batch)
    return 0


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

    p = sub.add_parser(
        "init",
        help="create the project's MLflow store and Prefect database (set-up; `make demo` runs it)",
        description="Creates or upgrades the local stores so that the first `tunery run` does not "
        "pay their migrations. Idempotent; servers named by MLFLOW_TRACKING_URI or PREFECT_API_URL "
        "are used as they are.",
    )
    p.set_defaults(fn=cmd_init)

    p = sub.add_parser(
        "run",
        help="run the pipeline: the dvc.yaml stages as a Prefect flow under one MLflow parent run, then the registry gate",
        description="Stages read params.yaml (DVC tracks it): edit it to change a run.",
    )
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
    p.add_argument(
        "--allow-new-labels",
        action="store_true",
        help="accept labels the data does not have yet (adds classes; default: refused)",
    )
    _params_args(p)
    p.set_defaults(fn=cmd_data_add)

    p = data.add_parser(
        "withdraw",
        help="take a file that was taken in back out (recorded; the next run is a new data version)",
    )
    p.add_argument("name", help="the file's name in the incoming folder (see `ls data/incoming`)")
    p.add_argument("--reason", required=True, help="why (recorded in data/withdrawn.jsonl)")
    _params_args(p)
    p.set_defaults(fn=cmd_data_withdraw)

    p = sub.add_parser(
        "retrain", help="re-fine-tune now: take in new data, re-run stale stages, gate"
    )
    p.add_argument(
        "--ignore-drift",
        action="store_true",
        help="retrain even when the new data's drift is below retrain.drift.min_auc",
    )
    p.set_defaults(fn=cmd_retrain)

    p = sub.add_parser(
        "schedule", help="serve the retrain flow on a schedule (embedded Prefect server)"
    )
    when = p.add_mutually_exclusive_group(required=True)
    when.add_argument("--cron", help='cron expression, e.g. "0 3 * * 1" (Mondays 03:00)')
    when.add_argument("--interval", type=float, help="seconds between runs")
    p.set_defaults(fn=cmd_schedule)

    p = sub.add_parser(
        "demo-shard", help="release the next shard of WordNet demo data into the landing folder"
    )
    p.add_argument("--per-class", type=int, default=40, help="glosses per category (default: 40)")
    _params_args(p)
    p.set_defaults(fn=cmd_demo_shard)

    p = sub.add_parser(
        "models", help="list registered model versions with aliases, key metrics and gate decisions"
    )
    p.add_argument("--log", action="store_true", help="also print the promotion log")
    _params_args(p)
    p.set_defaults(fn=cmd_models)

    p = sub.add_parser(
        "promote", help="make VERSION the champion by hand (recorded in the promotion log)"
    )
    p.add_argument("version", help="registered model version number")
    p.add_argument("--reason", required=True, help="why (recorded on the version and in the log)")
    p.add_argument(
        "--force",
        action="store_true",
        help="promote a version the gate rejected (recorded as forced)",
    )
    _params_args(p)
    p.set_defaults(fn=cmd_promote)

    p = sub.add_parser(
        "rollback", help="put the previous champion back (recorded in the promotion log)"
    )
    p.add_argument("--reason", default="rollback", help="why (recorded)")
    _params_args(p)
    p.set_defaults(fn=cmd_rollback)

    p = sub.add_parser(
        "predict", help="score a CSV/JSONL/Parquet file with a deployable ONNX model"
    )
    p.add_argument("input", help="CSV, JSONL or Parquet file with a text column")
    p.add_argument("-o", "--output", required=True, help="output file (.csv, .jsonl or .parquet)")
    p.add_argument("--model", default=CHAMPION_MODEL, help=MODEL_HELP)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--text-column", default="text")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(fn=cmd_predict)

    p = sub.add_parser("serve-model", help="serve a deployable ONNX model over HTTP (FastAPI)")
    p.add_argument("--model", default=CHAMPION_MODEL, help=MODEL_HELP)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: localhost only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=256, help="most texts in one request")
    p.set_defaults(fn=cmd_serve_model)

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
    except BrokenPipeError:  # `tunery models | head`: the reader left; not an error of ours
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(0)


if __name__ == "__main__":
    main()

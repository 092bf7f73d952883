"""The `tunery` command.

One convention for every command (see README: The command line):
- `-p FILE` / `--set SECTION.KEY=VALUE` wherever params are read. Commands that run DVC stages
  (`run`, `retrain`, `schedule`, `init`) write them into params.yaml before anything starts,
  because the stages read that file and dvc.lock records it; the others apply them in memory.
- `--json` wherever a script would read the output: one JSON document on stdout, everything else
  (logs, stage output, progress) on stderr.
- Exit codes by class (tunery/errors.py): 0 ok, 1 failed at run time, 2 usage, 3 bad config or
  data, 4 refused by the registry. Every mistake is one line on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from tunery import __version__, env, run_summary, ui
from tunery.errors import EXIT_CODES, InputError, TuneryError

log = logging.getLogger("tunery")

PARAMS_FILE = "params.yaml"
TABLE_SUFFIXES = (".csv", ".jsonl", ".ndjson", ".parquet")  # what `predict` reads and writes


# --------------------------------------------------------------------------- shared arguments
def _params_args(p: argparse.ArgumentParser, *, writes: bool = False) -> None:
    """`-p` and `--set`. `writes`: the command runs DVC stages, so both end up in params.yaml."""
    if writes:
        file_help = (
            "params file to run with: validated, then written over params.yaml, which the stages "
            "read and dvc.lock records (default: params.yaml)"
        )
        set_help = (
            "override one param (YAML value syntax, repeatable); written into params.yaml before "
            "anything runs, so DVC records it (`git diff params.yaml` shows it)"
        )
    else:
        file_help = "params file (default: params.yaml in the project)"
        set_help = "override one param for this command only; YAML value syntax (repeatable)"
    p.add_argument("-p", "--params", default=PARAMS_FILE, help=file_help)
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help=set_help,
    )


def _json_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON document on stdout (logs and stage output go to stderr)",
    )


def _params_path(args: argparse.Namespace, root: Path) -> Path:
    path = Path(args.params)
    return path if path.is_absolute() or path.exists() else root / path


def _load(args: argparse.Namespace, root: Path):
    """Params for a command that runs no stage: `-p` and `--set` apply in memory only."""
    from tunery.config import load_params

    return load_params(_params_path(args, root), args.set)


def _registry(args: argparse.Namespace, root: Path):
    """The registry a command acts on (`registry.model_name`, `tracking.experiment` of its params:
    the text pipeline's or, inside `vision/`, the image pipeline's), built once here and passed
    down."""
    from tunery.registry.refs import Registry
    from tunery.runner.vision import is_vision_params

    path = _params_path(args, root)
    if is_vision_params(path):
        from tunery.vision.params import load_vision_params

        return Registry.of(load_vision_params(path, args.set), root)
    return Registry.of(_load(args, root), root)


def _load_for_stages(args: argparse.Namespace, root: Path):
    """Params for a command that runs DVC stages: `-p`/`--set` are validated, then written into
    params.yaml (atomically, comments kept) before anything starts, and the change is said on
    stderr. DVC then records exactly what ran in dvc.lock; see config.write_params for why."""
    from tunery import profile
    from tunery.config import load_params, write_params

    profile.verify(root)  # a store that does not answer: a named error, nothing run or written
    dest = root / PARAMS_FILE
    changes = write_params(dest, args.set, source=_params_path(args, root))
    args.params_changed = changes
    if changes:
        print(
            f"params.yaml changed ({len(changes)} setting(s); the stages read it and dvc.lock "
            "records it; `git diff params.yaml` shows it, `git checkout params.yaml` undoes it):\n"
            + "\n".join(f"  {c}" for c in changes),
            file=sys.stderr,
        )
    return load_params(dest)


def _emit(args: argparse.Namespace, doc: dict[str, Any]) -> None:
    """Keep the command's JSON document; main() prints it on the real stdout at the end."""
    args.json_doc = doc


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Send everything written to stdout (ours, DVC's and the stages' subprocesses') to stderr,
    so that with --json stdout carries the JSON document and nothing else."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no stdout at all
        saved = None
    if saved is not None:
        os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stderr.flush()
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)


# --------------------------------------------------------------------------- check
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
        return f"{src.kind} at {path}"
    found = files.list_files(path, files.LABELLED_SUFFIXES)
    if not found:
        raise DataValidationError(path, "missing_file", "no .csv, .jsonl or .parquet file")
    for file in found:
        files.read_labelled(file, src.text_column, src.label_column, origin="check")
    return f"{len(found)} file(s) in {path} with columns {src.text_column!r}, {src.label_column!r}"


def _dvc_remote(root: Path) -> str:
    """The default DVC remote as .dvc/config (and config.local) name it; no DVC import."""
    import configparser

    config = configparser.ConfigParser()
    config.read([root / ".dvc" / "config", root / ".dvc" / "config.local"])
    name = config.get("core", "remote", fallback=None)
    if not name:
        return "none configured (`dvc remote add -d NAME URL`)"
    url = config.get(f"'remote \"{name}\"'", "url", fallback="?")
    return f"{name!r} at {url}"


def _stores(reg: Any) -> dict[str, str]:
    from tunery import tracking

    prefect = os.environ.get("PREFECT_API_URL") or (
        f"a temporary server per run, database in {os.environ.get('PREFECT_HOME', '~/.prefect')}"
    )
    return {
        "mlflow": f"{tracking.tracking_uri(reg.root)} (experiment {reg.experiment!r}, "
        f"model {reg.name!r})",
        "dvc_remote": _dvc_remote(reg.root),
        "prefect": prefect,
    }


def cmd_check(args: argparse.Namespace, root: Path) -> int:
    from tunery import profile
    from tunery.runner.steps import stage_names

    params = _load(args, root)
    source = _check_source(params, root)
    stages = stage_names(root)
    from tunery.registry.refs import Registry

    stores = _stores(Registry.of(params, root))
    in_force, _ = profile.load(root)
    answers = profile.verify(root)
    overrides = f" (with {len(args.set)} override(s))" if args.set else ""
    if args.json:
        doc: dict[str, Any] = {
            "ok": True,
            "params_file": str(args.params),
            "overrides": list(args.set),
            "source": source,
            "stages": stages,
            "stores": stores,
            "profile": {"name": in_force.name, "file": in_force.source, "answers": answers},
        }
        if args.show:
            doc["params"] = params.model_dump(mode="json")
        _emit(args, doc)
        return 0
    if args.show:
        print(yaml.safe_dump(params.model_dump(mode="json"), sort_keys=False).rstrip() + "\n")
    print(f"profile: {in_force.name}" + (f" ({in_force.source})" if in_force.source else ""))
    print(f"source:  {source}")
    print(f"stages:  {' -> '.join(stages)}")
    print(f"MLflow:  {stores['mlflow']}")
    print(f"DVC:     remote {stores['dvc_remote']}")
    print(f"Prefect: {stores['prefect']}")
    print("stores:  " + "; ".join(f"{k}: {v}" for k, v in answers.items()))
    print(
        f"OK: {args.params} is valid{overrides}"
        + ("" if args.show else " (`tunery check --show` prints the full config)")
    )
    return 0


def cmd_init(args: argparse.Namespace, root: Path) -> int:
    """Create the project's local state once, at set-up: the MLflow store and experiment,
    Prefect's server database and the offline page template of `dvc plots show`. `tunery run` would create them too, but on a fresh clone that adds
    ~10 s of database migrations to the first run. Safe to repeat (it upgrades, never resets)."""
    from flows.server import init_server_database
    from tunery import tracking

    params = _load_for_stages(args, root)
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
    from tunery import dvc_plots

    template = dvc_plots.install(root)
    print(
        f"DVC plots: `dvc plots show` renders offline (Vega inlined: {template.relative_to(root)})"
    )
    return 0


# --------------------------------------------------------------------------- run, retrain
def _start_flow_services(root: Path, params) -> Any:
    """Start what a flow needs side by side: Prefect's temporary server (its own process), the
    DVC worker (its own process) and the MLflow store (here). The caller imports its flow module,
    then `server.wait()`s. Sequential, these were ~13 s of start-up on 2 cores before the first
    stage; side by side ~7 s (see flows/server.py). Returns the server (None: one is named)."""
    from flows.server import start_temporary_server
    from tunery import tracking
    from tunery.runner.steps import start_dvc_worker

    server = start_temporary_server()
    start_dvc_worker(root)
    tracking.setup(root, params.tracking.experiment)
    return server


def _check_stage_names(root: Path, stages: list[str]) -> None:
    from tunery.runner.steps import stage_names

    known = stage_names(root)
    unknown = [s for s in stages if s not in known]
    if unknown:
        raise InputError(f"unknown stage(s) {', '.join(unknown)}: dvc.yaml has {', '.join(known)}")


def _write_vision_params(args: argparse.Namespace, root: Path):
    """The image pipeline's params with `-p`/`--set` written into its params.yaml (as the text
    pipeline's are, so dvc.lock records what ran); the change said on stderr."""
    from tunery.config import write_params
    from tunery.vision.params import VisionParams, load_vision_params

    args.params_changed = write_params(
        root / PARAMS_FILE, args.set, source=_params_path(args, root), schema=VisionParams
    )
    for change in args.params_changed:
        print(f"params.yaml changed: {change}", file=sys.stderr)
    return load_vision_params(root / PARAMS_FILE)


def _cmd_run_vision(args: argparse.Namespace, root: Path) -> int:
    """`tunery run` in an image pipeline folder (vision/): its params written like the text
    pipeline's, then its DVC stages (tunery/runner/vision.py)."""
    from tunery.runner import vision

    _write_vision_params(args, root)
    result = vision.run(
        root,
        args.stages,
        force=args.force,
        on_line=lambda line: print(line, end="", file=sys.stderr),
    )
    if args.json:
        _emit(args, {"ok": True, "command": "run", "modality": "image", **result})
    else:
        print(vision.end_lines(result))
    return 0


def cmd_run(args: argparse.Namespace, root: Path) -> int:
    from tunery.runner.vision import is_vision_params
    from tunery.stage import process_start

    if is_vision_params(_params_path(args, root)):
        return _cmd_run_vision(args, root)
    params = _load_for_stages(args, root)  # bad params: a clear error before anything starts
    _check_stage_names(root, args.stages)
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
    summary = run_summary.build(root, params, result, partial=bool(args.stages))
    ran = [r["stage"] for r in result["stages"] if r["ran"]]
    if args.json:
        _emit(
            args,
            {
                "ok": True,
                "command": "run",
                "run_id": result["run_id"],
                "stages_ran": ran,
                "stages": result["stages"],
                "params_changed": args.params_changed,
                "registry": result.get("registry"),
                "timing": result["timing"],
                **summary,
            },
        )
        return 0
    print(
        f"\npipeline run {result['run_id']}: stages run: "
        + (", ".join(ran) or "none (everything up to date)")
    )
    print(run_summary.stage_value_lines(root, params))
    t = result["timing"]
    print(
        f"wall {t['wall_seconds']:.0f} s; orchestration + tracking overhead "
        f"{t['overhead_seconds']:.1f} s ({100 * t['overhead_share']:.1f} %)"
        + (
            f"; failed stage attempts (retried) {t['failed_attempts_seconds']:.0f} s"
            if t.get("failed_attempts_seconds")
            else ""
        )
    )
    print(run_summary.terminal(summary))
    return 0


def _print_drift(result: dict[str, Any]) -> None:
    if result.get("drift"):
        d = result["drift"]
        print(
            f"drift of the new data vs training: AUC {d['auc']:.3f} "
            f"(0.5 = none), centroid distance {d['centroid_distance']:.4f}"
        )


def _cmd_retrain_vision(args: argparse.Namespace, root: Path) -> int:
    """`tunery retrain` in an image pipeline folder: the same retrain flow (intake, drift, the
    folder's DVC stages, the gate in its register stage), the image end of run."""
    from tunery.runner import vision

    params = _write_vision_params(args, root)
    server = _start_flow_services(root, params)
    from flows.retrain import retrain_flow

    if server is not None:
        server.wait()
    result = retrain_flow(project=str(root), ignore_drift=args.ignore_drift)
    if args.json:
        _emit(args, {"ok": True, "command": "retrain", "modality": "image", **result})
        return 0
    _print_drift(result)
    if result["status"] != "retrained":
        print(
            f"retrain: {result['status']}"
            + (f" ({result['reason']})" if result.get("reason") else "")
        )
        return 0
    print(f"\nretrain: took in {len(result['added'])} drop(s)")
    print(vision.end_lines(result))
    return 0


def cmd_retrain(args: argparse.Namespace, root: Path) -> int:
    from tunery.runner.vision import is_vision_params

    if is_vision_params(_params_path(args, root)):
        return _cmd_retrain_vision(args, root)
    params = _load_for_stages(args, root)
    server = _start_flow_services(root, params)
    from flows.retrain import retrain_flow

    if server is not None:
        server.wait()

    result = retrain_flow(project=str(root), ignore_drift=args.ignore_drift)
    retrained = result["status"] == "retrained"
    summary = run_summary.build(root, params, result, partial=False) if retrained else {}
    if args.json:
        _emit(
            args,
            {
                "ok": True,
                "command": "retrain",
                "params_changed": args.params_changed,
                **result,
                **(
                    {"stages_ran": [r["stage"] for r in result["stages"] if r["ran"]]}
                    if retrained
                    else {}
                ),
                **summary,
            },
        )
        return 0
    _print_drift(result)
    if not retrained:
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
    print(run_summary.stage_value_lines(root, params))
    print(run_summary.terminal(summary))
    return 0


def _validate_schedule(root: Path, cron: str | None, interval: float | None) -> None:
    """Build the deployment Prefect will serve, so a bad cron is one line before anything
    starts (Prefect's own schedule validation, not a second parser of cron syntax)."""
    from flows.retrain import deployment

    try:
        deployment(str(root), cron=cron, interval=interval)
    except ValueError as exc:  # pydantic's ValidationError is one
        errors = getattr(exc, "errors", None)
        detail = errors()[0]["msg"] if callable(errors) else str(exc).splitlines()[0]
        raise InputError(
            f"--cron {cron!r}: {detail.removeprefix('Value error, ')} (five fields: minute "
            'hour day-of-month month day-of-week, e.g. "0 3 * * 1" for Mondays 03:00)'
        ) from None


def cmd_schedule(args: argparse.Namespace, root: Path) -> int:
    from flows.retrain import serve
    from tunery.runner.vision import is_vision_params

    _validate_schedule(root, args.cron, args.interval)
    if is_vision_params(_params_path(args, root)):  # the image pipeline folder: same flow
        _write_vision_params(args, root)
    else:
        _load_for_stages(args, root)
    when = f"cron {args.cron!r}" if args.cron else f"every {args.interval:g} s"
    print(f"serving the retrain flow ({when}) with the embedded Prefect server; Ctrl-C stops it.")
    serve(str(root), cron=args.cron, interval=args.interval)
    return 0


# --------------------------------------------------------------------------- data and registry
def _add_image_drop(args: argparse.Namespace, root: Path, params: Any) -> Path:
    """`data add` inside the image pipeline folder: a drop folder (tunery/vision/retrain.py)."""
    from tunery.vision.retrain import add_drop

    if args.allow_new_labels:
        raise InputError(
            "--allow-new-labels is the text pipeline's; for images declare the classes in "
            "ingest.checks.labels (params.yaml here), then a drop may bring any of them"
        )
    return add_drop(root, params, Path(args.path))


def cmd_data_add(args: argparse.Namespace, root: Path) -> int:
    from tunery import modality
    from tunery.data.intake import add_file
    from tunery.runner.steps import dvc_command

    params = modality.load_params(_params_path(args, root), args.set)
    if modality.is_image(params):
        dest = _add_image_drop(args, root, params)
    else:
        cfg = params.ingest
        if args.allow_new_labels:
            cfg = cfg.model_copy(update={"allow_new_labels": True})
        dest = add_file(Path(args.path), cfg, root=root)
    dvc_command(root, "add", str(dest.relative_to(root)))
    if args.push:
        dvc_command(root, "push")
    print(
        f"added {args.path} as {dest.relative_to(root)}; `tunery run` (or `dvc repro`) ingests it"
    )
    return 0


def cmd_data_withdraw(args: argparse.Namespace, root: Path) -> int:
    import shutil

    from tunery import modality
    from tunery.data.intake import WITHDRAWN_LOG, withdraw
    from tunery.runner.steps import dvc_command

    params = modality.load_params(_params_path(args, root), args.set)
    drops = modality.is_image(params)  # the image pipeline takes in drop folders
    record = withdraw(args.name, params.ingest, root=root, reason=args.reason, drops=drops)
    if record["dvc_file"].is_file():
        dvc_command(root, "remove", str(record["dvc_file"].relative_to(root)))
    if record["path"].is_dir():
        shutil.rmtree(record["path"])
    record["path"].unlink(missing_ok=True)
    print(
        f"withdrew {record['file']} ({record['rows']} {'images' if drops else 'rows'}; it was "
        f"part of data version {record['in_data_version'] or 'none yet'}), recorded in "
        f"{Path(params.ingest.incoming).parent / WITHDRAWN_LOG}; the next `tunery run` or `tunery retrain` "
        "ingests without it (a new data version) and re-trains"
    )
    return 0


def cmd_models(args: argparse.Namespace, root: Path) -> int:
    from tunery import tracking

    reg = _registry(args, root)
    name = reg.name
    rows = []
    for v in tracking.list_versions(root, name):
        f1 = v["metrics"].get("holdout_macro_f1", v["tags"].get("holdout_macro_f1"))
        rows.append(
            {
                "version": v["version"],
                "aliases": v["aliases"],
                "holdout_macro_f1": float(f1) if f1 not in (None, "") else None,
                "gate_decision": v["tags"].get("gate.decision"),
                "gate_reason": v["tags"].get("gate.reason", ""),
                "run_id": v["run_id"],
                "created": v["created"],
            }
        )
    history = tracking.decisions(root, reg.experiment, name) if args.log else None
    if args.json:
        _emit(
            args,
            {"model": name, "versions": rows, **({"log": history} if args.log else {})},
        )
        return 0
    if not rows:
        print(f"model {name!r} has no registered versions yet (run the pipeline: tunery run)")
        return 0
    print(f"{'version':>7}  {'aliases':<22} {'holdout macro-F1':>16}  {'gate':<9} reason")
    for r in rows:
        f1_text = f"{r['holdout_macro_f1']:.4f}" if r["holdout_macro_f1"] is not None else "-"
        print(
            f"{r['version']:>7}  {','.join(r['aliases']) or '-':<22} {f1_text:>16}  "
            f"{r['gate_decision'] or '-':<9} {r['gate_reason']}"
        )
    if history is not None:
        print("\npromotion log (oldest first):")
        for e in history:
            print(
                f"  {e.get('utc', '?')}  {e.get('action'):<15} {e.get('from') or '-':>4} -> {e.get('to') or '-':<4} {e.get('reason', '')}"
            )
    return 0


def cmd_promote(args: argparse.Namespace, root: Path) -> int:
    from tunery.registry import promotion

    record = promotion.promote(_registry(args, root), args.version, args.reason, force=args.force)
    forced = " (forced past the gate's rejection)" if record.get("forced") else ""
    print(f"champion: version {record['from'] or 'none'} -> {record['to']} ({args.reason}){forced}")
    return 0


def cmd_rollback(args: argparse.Namespace, root: Path) -> int:
    from tunery.registry import promotion

    record = promotion.rollback(_registry(args, root), args.reason)
    print(f"champion rolled back: version {record['from']} -> {record['to']} ({record['reason']})")
    return 0


def cmd_demo_shard(args: argparse.Namespace, root: Path) -> int:
    from tunery import modality
    from tunery.runner.landing import release_demo_shard

    params = modality.load_params(_params_path(args, root), args.set)
    dest = release_demo_shard(root, params, args.per_class)
    print(f"released {dest.relative_to(root)}; `tunery retrain` takes it in")
    return 0


def cmd_ui(args: argparse.Namespace, root: Path) -> int:
    from tunery.orphans import run_groups
    from tunery.runner.steps import tool_env
    from tunery.tracking import ARTIFACT_DIR, tracking_uri

    uri, commands, lines = tracking_uri(root), [], []
    if uri.startswith("sqlite:"):
        commands.append(ui.mlflow_command(uri, root / ARTIFACT_DIR, args.host, args.port))
        lines.append(
            f"MLflow UI on http://{args.host}:{args.port}: MLflow 3 may open on its GenAI view: "
            "switch to 'Model training', open the experiment: Runs (the pipeline, its stages "
            "nested), Models (their LoggedModels); the registry is under Models."
        )
    else:  # a tracking server has its UI; a local one on its URI would be wrong
        lines.append(f"MLflow: MLFLOW_TRACKING_URI names a tracking server: open {uri}")
    prefect = os.environ.get("PREFECT_API_URL")
    if prefect:
        lines.append(
            f"Prefect: PREFECT_API_URL names a server: open {prefect.removesuffix('/api')}"
        )
    elif args.no_prefect:
        lines.append("Prefect UI: off (--no-prefect)")
    else:
        commands.append(ui.prefect_command(args.host, args.prefect_port))
        lines.append(
            f"Prefect UI on {ui.prefect_ui_url(args.host, args.prefect_port)}: Runs (each "
            "`tunery run`/`retrain` flow run, its stages as task runs, logs, the summary "
            "artifact); a run started meanwhile shows up live."
        )
    print("\n".join(lines))
    if not commands:
        return 0
    print("(Ctrl-C to stop)")
    env = ui.prefect_env(tool_env(), args.host, args.prefect_port)
    serves_prefect = any(module == "prefect" for module, _ in commands)
    record = (
        ui.recorded(args.host, args.prefect_port) if serves_prefect else contextlib.nullcontext()
    )
    with record:  # own process groups, signals forwarded: a SIGTERM leaves nothing running
        return run_groups(commands, cwd=str(root), env=env)


CHAMPION_MODEL = "champion"
MODEL_HELP = (
    "`champion` (default: the registry's champion, a verified local copy), models:/NAME@ALIAS, "
    "models:/NAME/VERSION, or a model folder such as models/deploy (the last run's candidate, "
    "which the gate may have rejected)"
)


def _model_source(model: str, root: Path, reg: Any = None) -> str:
    """A model URI (`models:/name@alias`) as given; a relative folder against the project root;
    `champion`: the registry champion of `reg` (default: this project's params.yaml)."""
    if model == CHAMPION_MODEL:
        from tunery import tracking
        from tunery.config import load_params
        from tunery.registry.refs import CHAMPION, Registry

        if reg is None:
            reg = Registry.of(load_params(root / PARAMS_FILE), root)
        if tracking.alias_version(reg.root, reg.name, CHAMPION) is None:
            raise TuneryError(
                f"model {reg.name!r} has no champion yet: run the pipeline (`tunery run`), or pass "
                "--model models/deploy to use the last run's candidate"
            )
        return reg.alias_uri(CHAMPION)
    if ":/" in model or Path(model).is_absolute() or Path(model).exists():
        return model
    return str(root / model)


def _table_columns(path: Path) -> list[str]:
    """The columns of a CSV/JSONL/Parquet file from its header alone (cheap: no full read)."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            import pandas as pd

            return [str(c) for c in pd.read_csv(path, nrows=0).columns]
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return list(pq.read_schema(path).names)
        with path.open(encoding="utf-8") as lines:
            first = next((line for line in lines if line.strip()), "{}")
        row = json.loads(first)
        return list(row) if isinstance(row, dict) else []
    except Exception as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"{path}: cannot read as {suffix[1:]}: {first_line}") from None


def _check_predict_files(src: Path, dest: Path, text_column: str, image_column: str) -> None:
    """What `predict` can check before loading a model (seconds): the output's format, that the
    input exists and is a folder, an image or a table with a text or an image-path column."""
    if dest.suffix.lower() not in TABLE_SUFFIXES:
        raise InputError(
            f"{dest}: unsupported output format {dest.suffix!r} (use .csv, .jsonl or .parquet)"
        )
    if not src.exists():
        raise InputError(f"{src}: file not found")
    from tunery.data.images import IMAGE_SUFFIXES

    if src.is_dir() or src.suffix.lower() in IMAGE_SUFFIXES:
        return  # images: an image model checks every one before scoring
    if src.suffix.lower() not in TABLE_SUFFIXES:
        raise InputError(
            f"{src}: unsupported input format {src.suffix!r} (use .csv, .jsonl or .parquet; for "
            f"an image model also a folder of images or one image: {', '.join(IMAGE_SUFFIXES)})"
        )
    columns = _table_columns(src)
    if columns and text_column not in columns and image_column not in columns:
        raise InputError(
            f"{src}: no column {text_column!r} (columns: {', '.join(columns)}; see --text-column, "
            "or --image-column for a manifest of images)"
        )


def cmd_predict(args: argparse.Namespace, root: Path) -> int:
    src, dest = Path(args.input), Path(args.output)
    _check_predict_files(src, dest, args.text_column, args.image_column)
    model = _model_source(args.model, root, _registry(args, root))
    from tunery.onnx.runtime import Predictor, predict_file

    predictor = Predictor(model, device=args.device, batch_size=args.batch_size)
    log.info(
        "model %s: %s model, variant %s on %s",
        model,
        predictor.modality,
        predictor.metadata["variant"],
        predictor.provider,
    )
    n = predict_file(
        predictor,
        src,
        dest,
        text_column=args.text_column,
        image_column=args.image_column,
        show_progress=not args.no_progress,
    )
    print(f"scored {n} rows from {args.input} into {args.output} ({predictor.provider})")
    return 0


def cmd_serve_model(args: argparse.Namespace, root: Path) -> int:
    model = _model_source(args.model, root, _registry(args, root))
    from tunery.onnx.http import serve
    from tunery.onnx.runtime import Predictor

    predictor = Predictor(model, device=args.device, batch_size=args.batch_size)
    serve(
        predictor,
        host=args.host,
        port=args.port,
        max_batch=args.max_batch,
        max_bytes=args.max_image_bytes,
    )
    return 0


# --------------------------------------------------------------------------- the parser
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {value:g}")
    return value


def _port(text: str) -> int:
    value = _positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"a port is 1-65535, got {value}")
    return value


DEVICE_HELP = "where the ONNX model runs: auto (CUDA when onnxruntime-gpu sees a GPU), cpu or cuda"
BATCH_HELP = "texts or images per inference batch (default: 64)"
PREDICT_DESCRIPTION = """\
Score texts or images with a deployable ONNX model (the model's manifest says which it takes).

  text model    a CSV, JSONL or Parquet file with a text column (--text-column)
  image model   a folder of images (any depth; .png .jpg .jpeg .webp .bmp), one image file, or
                a CSV/JSONL/Parquet manifest whose --image-column names each image relative to
                the manifest's folder. Every image is checked before any is scored; one that is
                not an image stops it with its name (exit 3). Other sizes and modes are resized
                and converted as the model's processor contract says.

The output (.csv, .jsonl or .parquet) has the input's columns (for a folder or an image:
'image', the paths) plus prediction, score (the calibrated probability of the prediction) and
one prob_<label> column per class."""

EPILOG = "exit codes:\n" + "\n".join(f"  {code:>3}  {what}" for code, what in EXIT_CODES.items())
EPILOG += (
    "\n  130  interrupted (Ctrl-C)\n\n"
    "Every command that reads params takes -p FILE and --set SECTION.KEY=VALUE; run, retrain,\n"
    "schedule and init write them into params.yaml first (DVC records what ran in dvc.lock).\n"
    "check, models, run and retrain take --json: one JSON document on stdout, logs on stderr."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tunery",
        description="Keep a fine-tuned transformer fresh: versioned data -> pretraining -> PEFT fine-tuning "
        "-> evaluation -> ONNX -> registry. Run inside the project folder (where params.yaml is).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"tunery {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for add in (_pipeline_commands, _data_commands, _registry_commands, _serving_commands):
        add(sub)
    return parser


def _pipeline_commands(sub: Any) -> None:
    """check, init, run, retrain, schedule: the commands that validate or run the stages."""
    p = sub.add_parser(
        "check",
        help="validate params.yaml (and overrides) and the data source; print a short summary",
    )
    p.add_argument("--show", action="store_true", help="also print the full, validated config")
    _params_args(p)
    _json_arg(p)
    p.set_defaults(fn=cmd_check)

    p = sub.add_parser(
        "init",
        help="create the project's MLflow store and Prefect database (set-up; `make demo` runs it)",
        description="Creates or upgrades the local stores so that the first `tunery run` does not "
        "pay their migrations. Idempotent; servers named by MLFLOW_TRACKING_URI or PREFECT_API_URL "
        "are used as they are.",
    )
    _params_args(p, writes=True)
    p.set_defaults(fn=cmd_init)

    p = sub.add_parser(
        "run",
        help="run the pipeline: the dvc.yaml stages as a Prefect flow under one MLflow parent run, then the registry gate",
        description="Stages read params.yaml (DVC tracks it): edit it, or pass -p/--set, which "
        "are written into it before anything runs.",
    )
    p.add_argument("stages", nargs="*", help="stages to bring up to date (default: all)")
    p.add_argument(
        "--force", action="store_true", help="re-run stages even if DVC says they are up to date"
    )
    _params_args(p, writes=True)
    _json_arg(p)
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser(
        "retrain", help="re-fine-tune now: take in new data, re-run stale stages, gate"
    )
    p.add_argument(
        "--ignore-drift",
        action="store_true",
        help="retrain even when the new data's drift is below retrain.drift.min_auc",
    )
    _params_args(p, writes=True)
    _json_arg(p)
    p.set_defaults(fn=cmd_retrain)

    p = sub.add_parser(
        "schedule", help="serve the retrain flow on a schedule (embedded Prefect server)"
    )
    when = p.add_mutually_exclusive_group(required=True)
    when.add_argument("--cron", help='cron expression, e.g. "0 3 * * 1" (Mondays 03:00)')
    when.add_argument("--interval", type=_positive_float, help="seconds between runs")
    _params_args(p, writes=True)
    p.set_defaults(fn=cmd_schedule)


def _data_commands(sub: Any) -> None:
    """data add/withdraw, demo-shard: what goes into the dataset."""
    data = sub.add_parser("data", help="manage the dataset").add_subparsers(
        dest="data_command", required=True, metavar="ACTION"
    )
    p = data.add_parser(
        "add", help="validate a labelled file and append it to the dataset (new data version)"
    )
    p.add_argument(
        "path",
        help="CSV, JSONL or Parquet file with the configured text/label columns; inside vision/: "
        "a drop folder (a folder per class, or a manifest with image/label columns beside its images)",
    )
    p.add_argument("--push", action="store_true", help="also `dvc push` to the configured remote")
    p.add_argument(
        "--allow-new-labels",
        action="store_true",
        help="accept labels the data does not have yet (adds classes; default: refused; text only: "
        "images declare their classes in ingest.checks.labels)",
    )
    _params_args(p)
    p.set_defaults(fn=cmd_data_add)

    p = data.add_parser(
        "withdraw",
        help="take a file (a drop inside vision/) that was taken in back out (recorded; the next run "
        "is a new data version)",
    )
    p.add_argument(
        "name",
        help="the file's name in the incoming folder (see `ls data/incoming`); inside vision/: a drop's",
    )
    p.add_argument("--reason", required=True, help="why (recorded in data/withdrawn.jsonl)")
    _params_args(p)
    p.set_defaults(fn=cmd_data_withdraw)

    p = sub.add_parser(
        "demo-shard",
        help="release the next shard of demo data into the landing folder (WordNet glosses; "
        "inside vision/: Fashion-MNIST images the pipeline has not used)",
    )
    p.add_argument(
        "--per-class",
        type=_positive_int,
        default=40,
        help="glosses per category, or images per class inside vision/ (default: 40)",
    )
    _params_args(p)
    p.set_defaults(fn=cmd_demo_shard)


def _registry_commands(sub: Any) -> None:
    """models, promote, rollback: the MLflow registry."""
    p = sub.add_parser(
        "models", help="list registered model versions with aliases, key metrics and gate decisions"
    )
    p.add_argument("--log", action="store_true", help="also print the promotion log")
    _params_args(p)
    _json_arg(p)
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


def _serving_commands(sub: Any) -> None:
    """predict, serve-model, ui: using the models and seeing the runs."""
    p = sub.add_parser(
        "predict",
        help="score texts or images with a deployable ONNX model",
        description=PREDICT_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "input",
        help="text model: a CSV, JSONL or Parquet file with a text column; image model: a folder "
        "of images, one image file, or a CSV/JSONL/Parquet manifest with an image-path column",
    )
    p.add_argument(
        "-o",
        "--output",
        required=True,
        help="output file (.csv, .jsonl or .parquet): the input's columns (a folder or an image: "
        "'image', the paths) plus prediction, score and prob_<label>",
    )
    p.add_argument("--model", default=CHAMPION_MODEL, help=MODEL_HELP)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help=DEVICE_HELP)
    p.add_argument(
        "--text-column", default="text", help="the input's column of texts (default: text)"
    )
    p.add_argument(
        "--image-column",
        default="image",
        help="an image manifest's column of image paths, relative to its folder (default: image)",
    )
    p.add_argument("--batch-size", type=_positive_int, default=64, help=BATCH_HELP)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _params_args(p)
    p.set_defaults(fn=cmd_predict)

    p = sub.add_parser("serve-model", help="serve a deployable ONNX model over HTTP (FastAPI)")
    p.add_argument("--model", default=CHAMPION_MODEL, help=MODEL_HELP)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help=DEVICE_HELP)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: localhost only)")
    p.add_argument("--port", type=_port, default=8000, help="port to listen on (default: 8000)")
    p.add_argument("--batch-size", type=_positive_int, default=64, help=BATCH_HELP)
    p.add_argument(
        "--max-batch", type=_positive_int, default=256, help="most texts or images in one request"
    )
    p.add_argument(
        "--max-image-bytes",
        type=_positive_int,
        default=10 * 2**20,
        help="largest image upload, in bytes (default: 10 MiB); larger ones get a 413",
    )
    _params_args(p)
    p.set_defaults(fn=cmd_serve_model)

    p = sub.add_parser("ui", help="the MLflow and Prefect UIs on this project's stores")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: localhost only)")
    p.add_argument(
        "--port", type=_port, default=ui.MLFLOW_PORT, help="MLflow UI port (default: %(default)s)"
    )
    p.add_argument(
        "--prefect-port",
        type=_port,
        default=ui.PREFECT_PORT,
        help="Prefect UI port (default: %(default)s)",
    )
    p.add_argument("--no-prefect", action="store_true", help="the MLflow UI only")
    p.set_defaults(fn=cmd_ui)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)  # usage errors: argparse's one line, exit 2
    from tunery.stage import setup_logging

    setup_logging(args.verbose)
    as_json = getattr(args, "json", False)
    args.json_doc, args.params_changed = None, []
    try:
        root = env.configure()  # a bad store profile (.env) is a named error too
        with _stdout_to_stderr() if as_json else contextlib.nullcontext():
            code = args.fn(args, root)
    except TuneryError as exc:
        print(f"tunery: error: {exc}", file=sys.stderr)
        if as_json:
            print(json.dumps({"ok": False, "exit_code": exc.exit_code, "error": str(exc)}))
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("tunery: interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # `tunery models | head`: the reader left; not an error of ours
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(0)
    if args.json_doc is not None:
        print(json.dumps(args.json_doc, indent=2, default=str))
    sys.exit(code)


if __name__ == "__main__":
    main()

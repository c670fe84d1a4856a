"""The ``geco`` command.

    geco render --config configs/local.yaml [--source URI] [--output URI] [--set k=v ...] [--force]
    geco config --config configs/local.yaml [--set k=v ...]     # print the validated config
    geco generate IMAGE [IMAGE ...] --checkpoint URI -o OUTDIR [--seed S] [--num-samples K] [--device cpu|cuda]
    geco models init-tiny DEST [--set k=v ...]                  # a tiny random checkpoint bundle
    geco train pretrain|stage1 --config configs/local.yaml [--set k=v ...]   # Ray Train (resumes)
    geco pseudo-gt --config configs/local.yaml [--data URI] [--output URI] [--teacher URI] [--reconstructor URI]
    geco train stage2 --config configs/local.yaml [--pseudo-gt URI] [--bundle URI]   # 3D consistency
    geco run --config configs/local.yaml [--set k=v ...] [--stages render,pretrain]  # the whole DAG
    geco retrain --config configs/local.yaml [--set k=v ...] [--force]  # new objects -> continue from production
    geco report RESULTS_DIR                                     # re-write an evaluation's report page
    geco register BUNDLE_URI [--metrics FILE.json [--model NAME]] --config ...  # a model version + aliases
    geco evaluate --checkpoint stage1=URI [--checkpoint teacher=URI ...] [--gso FOLDER] [--dataset URI]  # GSO metrics

The command line sits above both ``geco/`` (the library) and ``pipelines/`` (Ray). Stages that need
Ray or torch are imported lazily so ``geco --help`` stays fast.

What a person sees: progress, the project's own warnings (``WARNING: ...``), the summary, and for a
failure they can fix exactly one line ``geco: <the input>: <what is wrong and how to fix it>``
with exit status 2 (a traceback means a bug). Ray's own logs go to its session log folder
(see :mod:`pipelines.cluster`); the summary names it.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable

from geco.config import ConfigError, GecoConfig, load_config, read_config_file


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default=None, help="YAML config (default: built-in defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set render.blender.samples=32 (repeatable)")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="geco", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    r = sub.add_parser("render", help="render objects into WebDataset shards (Ray Data + BlenderProc)")
    _add_config_args(r)
    r.add_argument("--source", help="object source URI (overrides source.uri)")
    r.add_argument("--output", "-o", help="shard output dir or s3:// prefix (overrides dataset.uri)")
    r.add_argument("--force", action="store_true", help="re-render objects that are already in shards")
    r.add_argument("--retry-failed", action="store_true", help="retry objects that failed before")

    c = sub.add_parser("config", help="validate a config and print it with defaults filled in")
    _add_config_args(c)

    _add_weights_parser(sub)
    _add_generate_parser(sub)
    _add_models_parser(sub)
    _add_train_parser(sub)
    _add_run_parser(sub)
    _add_retrain_parser(sub)
    _add_report_parser(sub)
    _add_register_parser(sub)
    _add_evaluate_parser(sub)
    _add_pseudo_gt_parser(sub)
    return ap


def _add_run_parser(sub) -> None:
    from pipelines.dag import STAGES  # light: pipelines.dag imports its stages lazily

    d = sub.add_parser("run", help="the whole DAG (render -> pretrain -> stage1 -> pseudo_gt -> stage2 -> evaluate -> register) under one MLflow parent run; "
                                   "re-running does only what is missing")
    _add_config_args(d)
    d.add_argument("--stages", metavar="A,B", default=None,
                   help=f"run only these stages, in DAG order (default: all of {','.join(STAGES)})")


def _run_main(args) -> int:
    from pipelines import dag

    def work() -> int:
        stages = dag.parse_stages(args.stages)  # before any work (and before the config is loaded)
        cfg = load_config(args.config, args.overrides)
        result = dag.run(cfg, stages=stages, progress=lambda text: print(text, flush=True))
        _print_summary(result.summary())
        return 0

    return _guarded("run", work)


def _add_retrain_parser(sub) -> None:
    r = sub.add_parser("retrain", help="scheduled retraining: render the objects added to or changed in the source, "
                                       "continue training from the production model, evaluate, and move the production "
                                       "alias only if nothing regressed (exit 3 when it stays)")
    _add_config_args(r)
    r.add_argument("--force", action="store_true", help="train and evaluate even when nothing changed")


def _retrain_main(args) -> int:
    from pipelines import retrain

    def work() -> int:
        cfg = load_config(args.config, args.overrides)
        result = retrain.run(cfg, force=args.force, progress=lambda text: print(text, flush=True))
        _print_summary(result.summary())
        return result.exit_status

    return _guarded("retrain", work, prefix="retrain: ")


def _add_register_parser(sub) -> None:
    r = sub.add_parser("register", help="register a GECO bundle in the MLflow model registry with its GSO metrics; "
                                        "alias candidate, and production unless the metrics regress")
    _add_config_args(r)
    r.add_argument("bundle", metavar="BUNDLE_URI", help="GECO checkpoint: local folder, s3:// prefix, runs:/<id>/<path>")
    r.add_argument("--metrics", metavar="FILE", help="JSON: {\"gso/<view set>/<metric>\": value, ...}, or an evaluation "
                                                      "summary.json ({\"metrics\": {model: {...}}}, pick one with --model)")
    r.add_argument("--model", metavar="NAME", help="which model's metrics to take from a summary.json")
    r.add_argument("--evaluate-run", metavar="RUN_ID", help="the MLflow run the metrics come from (recorded on the version)")


def _read_metrics(path: str | None, model: str | None) -> dict:
    """The metrics a ``--metrics`` file gives (flat, or one model's in an evaluation summary)."""
    import json
    from pathlib import Path

    from geco.registry import RegistryError

    if not path:
        return {}
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise RegistryError(f"--metrics {path}: cannot read it as JSON ({e})") from None
    if isinstance(data, dict) and isinstance(data.get("metrics"), dict):
        models = data["metrics"]
        if model is None and len(models) == 1:
            model = next(iter(models))
        if model not in models:
            raise RegistryError(f"--metrics {path}: an evaluation summary with models {', '.join(sorted(models))}; "
                                "choose one with --model NAME")
        data = models[model]
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise RegistryError(f"--metrics {path}: expected a JSON object of metric name -> number")
    bad = [k for k, v in data.items() if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)))]
    if bad:
        raise RegistryError(f"--metrics {path}: not a number: {', '.join(bad[:5])} (null means unavailable)")
    return data


def _register_main(args) -> int:
    def work() -> int:
        cfg = load_config(args.config, args.overrides)
        metrics = _read_metrics(args.metrics, args.model)
        from pipelines import register
        from pipelines.stage import RegisterInputs

        result = register.run(cfg, RegisterInputs(bundle_uri=args.bundle, metrics=metrics,
                                                  evaluate_run_id=args.evaluate_run))
        print(result.summary())
        return 0

    return _guarded("register", work)


def _add_evaluate_parser(sub) -> None:
    e = sub.add_parser("evaluate", help="the GSO evaluation of checkpoints: PSNR/SSIM/LPIPS, CD/vIoU/F-score, "
                                        "seconds per object -> results folder, report, MLflow run")
    _add_config_args(e)
    e.add_argument("--checkpoint", action="append", default=[], metavar="NAME=URI",
                   help="a model under test (repeatable): NAME is teacher, teacher_1step, stage1 or stage2; URI a "
                        "GECO bundle (local, s3://, runs:/..., models:/name@alias; teachers also a Zero123++ folder "
                        "or pretrain output). Default: evaluate.models")
    e.add_argument("--gso", metavar="FOLDER", help="Google Scanned Objects folder, local or s3:// (overrides "
                   "evaluate.gso_uri; default: a few procedural objects in the GSO layout)")
    e.add_argument("--objects", metavar="A,B", help="object folder names (overrides evaluate.objects; default all)")
    e.add_argument("--dataset", metavar="URI", help="the training shards, for the leakage check (default: dataset.uri)")
    e.add_argument("--output", "-o", metavar="URI", help="results and ground-truth cache (overrides evaluate.output_uri)")


def _evaluate_main(args) -> int:
    overrides = list(args.overrides)
    if args.gso:
        overrides.append(f"evaluate.gso_uri={args.gso}")
    if args.objects:
        overrides.append(f"evaluate.objects=[{', '.join(n.strip() for n in args.objects.split(',') if n.strip())}]")
    if args.output:
        overrides.append(f"evaluate.output_uri={args.output}")
    models: dict[str, str] = {}
    for item in args.checkpoint:
        name, sep, uri = item.partition("=")
        if not sep or not name.strip() or not uri.strip():
            return _fail(f"--checkpoint {item!r}: expected NAME=URI, e.g. --checkpoint stage1=outputs/stage1/bundle")
        models[name.strip()] = uri.strip()
    def work() -> int:
        cfg = load_config(args.config, overrides)
        from pipelines import evaluate

        result = evaluate.run(cfg, evaluate.default_inputs(cfg, models, args.dataset))
        _print_summary(result.summary())
        return 0

    return _guarded("evaluate", work)


def _fail(message: str) -> int:
    """Say why on one line of stderr (a YAML parser's or a library's message may span several) -> 2."""
    print("geco: " + " ".join(str(message).split()), file=sys.stderr)
    return 2


def _user_errors() -> tuple[type[BaseException], ...]:
    """The exception classes that mean bad input, config, data, storage or cluster: one line, exit 2."""
    # imported here, not at the top: these modules pull in torch (pipelines.render, geco.generate),
    # and `geco --help` / `geco config` must not wait for it
    from geco.generate import GenerateError
    from geco.lease import LeaseError
    from geco.models.bundle import CheckpointError
    from geco.pseudo_gt import PseudoGTSetupError
    from geco.registry import RegistryError
    from geco.sources import SourceError
    from geco.storage import StorageError
    from geco.weights import WeightsImportError
    from pipelines.cluster import RayStartError
    from pipelines.evaluate import EvaluateError
    from pipelines.pseudo_gt import PseudoGTFailed
    from pipelines.render import RenderAborted
    from pipelines.retrain import RetrainError
    from pipelines.training import TrainSetupError

    return (ConfigError, StorageError, FileNotFoundError, FileExistsError, SourceError, TrainSetupError,
            RenderAborted, GenerateError, CheckpointError, WeightsImportError, RayStartError, RegistryError,
            LeaseError, EvaluateError, PseudoGTSetupError, PseudoGTFailed, RetrainError)


def _training_failed(err: BaseException, stage: str) -> str | None:
    """One line for a Ray Train job that failed beyond its restarts (None: ``err`` is something else).

    Ray Train V2 raises subclasses of ``ray.train.TrainingFailedError``: ``WorkerGroupError`` (a
    worker raised or died; ``worker_failures`` maps rank -> exception) or ``ControllerError``."""
    if "ray" not in sys.modules:  # no Ray job ran in this process
        return None
    from ray.exceptions import RayTaskError
    from ray.train import ControllerError, TrainingFailedError, WorkerGroupError

    if not isinstance(err, TrainingFailedError):
        return None
    if isinstance(err, WorkerGroupError) and err.worker_failures:
        rank, exc = min(err.worker_failures.items())
        if isinstance(exc, RayTaskError) and exc.cause is not None:
            exc = exc.cause
        what = f"worker rank {rank} ({len(err.worker_failures)} of the workers failed): {_first_line(exc)}"
    elif isinstance(err, ControllerError):
        what = f"Ray Train's controller failed: {_first_line(err.controller_failure)}"
    else:
        what = _first_line(err)
    return f"{stage}: training failed beyond its restarts: {what}; {_logs_hint()}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def _logs_hint() -> str:
    from pipelines.cluster import ray_log_dir

    folder = ray_log_dir()
    return f"the workers' logs are in {folder} (worker-*.err)" if folder else "see the Ray cluster's logs"


def _report_failure(err: BaseException, message: str, stage: str) -> int | None:
    """Print ``message`` as one line and return exit status 2 for a failure the user can act on
    (bad input, config, data, storage or cluster; a training job that failed beyond its restarts),
    or return None for a bug (the caller re-raises: a traceback)."""
    if isinstance(err, _user_errors()):
        return _fail(message)
    line = _training_failed(err, stage)
    if line is not None:
        return _fail(line)
    return None


def _guarded(stage: str, work: Callable[[], int], prefix: str = "") -> int:
    """Run a command's ``work`` -> its exit status; a failure the user can act on (bad config, input,
    data, storage or cluster; a DAG stage that failed of such a cause; a training job that failed
    beyond its restarts) -> one line ``geco: <prefix><what>`` (the prefix once) and 2; a bug -> its
    traceback."""
    from pipelines.dag import StageFailed  # light: the DAG imports its stages lazily

    try:
        return work()
    except ConfigError as e:
        return _fail(f"config error: {e}")
    except Exception as e:
        cause, where = (e.cause, e.stage) if isinstance(e, StageFailed) else (e, stage)
        message = str(e) if str(e).startswith(prefix) else f"{prefix}{e}"  # the prefix once
        code = _report_failure(cause, message, where)
        if code is None:
            raise
        return code


def _print_summary(summary: str) -> None:
    """The stage's summary, and where Ray's own logs went when this command used Ray."""
    print(summary)
    if "ray" in sys.modules:
        from pipelines.cluster import DRIVER_LOG, ray_log_dir

        folder = ray_log_dir()
        if folder:
            print(f"  ray logs: {folder} ({DRIVER_LOG}; workers: worker-*.out|err)")


def _add_report_parser(sub) -> None:
    r = sub.add_parser("report", help="(re-)write an evaluation results folder's report page (RESULTS_DIR/report/"
                                      "index.html + report.md) and print its path")
    r.add_argument("results_dir", metavar="RESULTS_DIR", help="the folder the evaluation wrote (holds summary.json)")


def _report_main(args) -> int:
    from geco.eval.report import ReportError, write_report

    try:
        print(write_report(args.results_dir))
        return 0
    except ReportError as e:
        return _fail(str(e))


def _add_train_parser(sub) -> None:
    t = sub.add_parser("train", help="train with Ray Train (re-running resumes from the latest checkpoint)")
    tsub = t.add_subparsers(dest="train_stage", required=True)
    p = tsub.add_parser("pretrain", help="train the teacher and/or reconstructor that have no pretrained weights")
    s1 = tsub.add_parser("stage1", help="stage 1: VSD distillation of the one-step generator")
    for q in (p, s1):
        _add_config_args(q)
        q.add_argument("--data", metavar="URI", help="shard dataset dir or s3:// prefix (overrides dataset.uri)")
    p.add_argument("--only", action="append", choices=["teacher", "reconstructor"],
                   help="train only this target (repeatable; default: pretrain.targets)")
    p.add_argument("--output", "-o", metavar="URI", help="where the weights go (overrides pretrain.output_uri)")
    s1.add_argument("--output", "-o", metavar="URI", help="where the generator and bundle go (overrides stage1.output_uri)")
    s1.add_argument("--teacher", metavar="URI", help="teacher folder or pretrain output (default: models.teacher."
                    "pretrained, else pretrain.output_uri's teacher when there); `tiny`: a tiny random one (tests)")
    s1.add_argument("--reconstructor", metavar="URI", help="reconstructor .safetensors or pretrain output (default: "
                    "models.reconstructor.pretrained, else pretrain.output_uri's when there)")
    _add_train_stage2_parser(tsub)


def _add_train_stage2_parser(tsub) -> None:
    s2 = tsub.add_parser("stage2", help="stage 2: 3D-consistency fine-tuning of the generator against pseudo-GT")
    _add_config_args(s2)
    s2.add_argument("--pseudo-gt", metavar="URI", help="pseudo-GT shards dir or s3:// prefix (default: "
                    "pseudo_gt.output_uri; render shards work too)")
    s2.add_argument("--bundle", metavar="URI", help="stage 1's GECO checkpoint: folder, s3:// or MLflow URI "
                    "(default: <stage1.output_uri>/bundle)")
    s2.add_argument("--output", "-o", metavar="URI", help="where the generator and bundle go (overrides stage2.output_uri)")


def _train_main(args) -> int:
    import importlib

    overrides = list(args.overrides)
    if getattr(args, "data", None):
        overrides.append(f"dataset.uri={args.data}")
    if getattr(args, "output", None):
        overrides.append(f"{args.train_stage}.output_uri={args.output}")
    def work() -> int:
        cfg = load_config(args.config, overrides)
        try:
            stage = importlib.import_module(f"pipelines.{args.train_stage}")
        except ModuleNotFoundError as e:
            if e.name != f"pipelines.{args.train_stage}":
                raise
            return _fail(f"`geco train {args.train_stage}` is not available in this version")
        kwargs = {"targets": args.only} if args.train_stage == "pretrain" and args.only else {}
        if args.train_stage == "stage1":
            kwargs["inputs"] = stage.default_inputs(cfg, teacher=args.teacher, reconstructor=args.reconstructor)
        if args.train_stage == "stage2":
            kwargs["inputs"] = stage.default_inputs(cfg, pseudo_gt=args.pseudo_gt, bundle=args.bundle)
        result = stage.run(cfg, **kwargs)
        _print_summary(result.summary())
        return 0

    return _guarded(args.train_stage, work)


def _add_pseudo_gt_parser(sub) -> None:
    p = sub.add_parser("pseudo-gt", help="pseudo ground truth for stage 2: teacher DDIM -> reconstructor -> "
                                         "rendered views, as shards (Ray Data; re-running computes only what changed)")
    _add_config_args(p)
    p.add_argument("--data", metavar="URI", help="render shards dir or s3:// prefix (overrides dataset.uri)")
    p.add_argument("--output", "-o", metavar="URI", help="pseudo-GT shards dir or s3:// prefix "
                                                          "(overrides pseudo_gt.output_uri)")
    p.add_argument("--teacher", metavar="URI", help="teacher folder or pretrain output (default: as stage 1's)")
    p.add_argument("--reconstructor", metavar="URI", help="reconstructor .safetensors or pretrain output "
                                                          "(default: as stage 1's)")
    p.add_argument("--retry-failed", action="store_true", help="retry objects that failed before")


def _pseudo_gt_main(args) -> int:
    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"dataset.uri={args.data}")
    if args.output:
        overrides.append(f"pseudo_gt.output_uri={args.output}")
    def work() -> int:
        from pipelines import pseudo_gt

        cfg = load_config(args.config, overrides)
        inputs = pseudo_gt.default_inputs(cfg, teacher=args.teacher, reconstructor=args.reconstructor)
        result = pseudo_gt.run(cfg, inputs, retry_failed=args.retry_failed)
        _print_summary(result.summary())
        return 0

    return _guarded("pseudo-gt", work)


def _add_generate_parser(sub) -> None:
    g = sub.add_parser("generate", help="image(s) -> 3D Gaussians (.ply), the 6 views (.png), a turntable (.gif)")
    g.add_argument("images", nargs="+", metavar="IMAGE", help="RGBA image(s), or object(s) on a plain white background")
    g.add_argument("--checkpoint", required=True, metavar="URI",
                   help="GECO checkpoint: local folder, s3:// prefix, runs:/<id>/<path>, models:/<name>@<alias>")
    g.add_argument("--output", "-o", required=True, metavar="OUTDIR", help="folder for the outputs")
    g.add_argument("--seed", type=int, default=0, help="random seed (sample k uses seed + k)")
    g.add_argument("--num-samples", type=int, default=1, metavar="K", help="objects per image")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    g.add_argument("--turntable-frames", type=int, default=24, help="GIF frames (0: no GIF)")
    g.add_argument("--turntable-size", type=int, default=256, help="GIF side in pixels")
    g.add_argument("--tracking-uri", default=None, help="MLflow tracking URI for runs:/ and models:/ checkpoints "
                   "(default: $MLFLOW_TRACKING_URI, else the project's sqlite:///mlruns.db)")


def _generate_main(args) -> int:
    from geco import generate
    from geco.storage import StorageError

    try:
        _check_s3_readable(args.checkpoint)
        generate.run(args.images, args.checkpoint, args.output, seed=args.seed, num_samples=args.num_samples,
                     device=args.device, turntable_frames=args.turntable_frames,
                     turntable_size=args.turntable_size, tracking_uri=args.tracking_uri)
        return 0
    except (generate.GenerateError, StorageError, FileNotFoundError) as e:
        return _fail(str(e))


def _check_s3_readable(uri: str) -> None:
    """An s3:// checkpoint: reach its endpoint and bucket first, so a wrong endpoint is one line."""
    from geco import storage

    if storage.is_s3(uri):
        storage.check_readable(uri)


def _add_models_parser(sub) -> None:
    m = sub.add_parser("models", help="GECO checkpoint bundles: write a tiny random one, show one")
    msub = m.add_subparsers(dest="models_command", required=True)
    mi = msub.add_parser("init-tiny", help="write a tiny randomly initialised checkpoint to DEST (local or s3://)")
    mi.add_argument("dest")
    _add_config_args(mi)
    mi.add_argument("--seed", type=int, default=0)
    mi.add_argument("--with-teacher-unet", action="store_true",
                    help="keep the teacher UNet's weights (default: an inference bundle without them)")
    mn = msub.add_parser("info", help="resolve a checkpoint URI and print its geco.json summary")
    mn.add_argument("uri")
    mn.add_argument("--tracking-uri", default=None)


def _models_main(args) -> int:
    from geco.models import bundle
    from geco.storage import StorageError

    try:
        if args.models_command == "init-tiny":
            base = {}
            if args.config:
                from pathlib import Path

                if not Path(args.config).is_file():
                    raise ConfigError(f"{args.config}: config file not found")
                base = read_config_file(args.config).get("models") or {}
            cfg = bundle.tiny_models_config(args.overrides, base)
            uri = bundle.init_tiny_bundle(args.dest, cfg, seed=args.seed, include_teacher_unet=args.with_teacher_unet)
            print(f"wrote a tiny random GECO checkpoint to {uri} (tiles {cfg.teacher.tile_size}px, "
                  f"reconstructor input {cfg.reconstructor.input_size}px)")
            return 0
        _check_s3_readable(args.uri)
        root = bundle.resolve_checkpoint(args.uri, tracking_uri=args.tracking_uri)
        m = bundle.read_manifest(root)
        comps = m.get("components", {})
        print(f"{args.uri} -> {root}\n  format {m['format']} v{m['version']}, created {m.get('created')}")
        for name, c in comps.items():
            extra = {k: v for k, v in c.items() if k not in ("path", "note")}
            print(f"  {name}: {c.get('path')} {extra}" + (f"\n    {c['note']}" if c.get("note") else ""))
        return 0
    except ConfigError as e:
        return _fail(f"config error: {e}")
    except (StorageError, FileNotFoundError, FileExistsError, ValueError) as e:
        return _fail(str(e))


def _add_weights_parser(sub) -> None:
    w = sub.add_parser("weights", help="import upstream weights as safetensors + manifest; verify them")
    wsub = w.add_subparsers(dest="weights_command", required=True)
    wi = wsub.add_parser("import", help="copy a model folder/file (local, s3:// or Hub id) into DEST")
    wi.add_argument("src", help="local path, s3:// URI, or Hugging Face Hub id owner/name[@revision]")
    wi.add_argument("dest", help="destination folder or s3:// prefix")
    wi.add_argument("--kind", default="auto", choices=["auto", "local", "s3", "hf"])
    wi.add_argument("--overwrite", action="store_true", help="replace an earlier import in DEST")
    wv = wsub.add_parser("verify", help="re-check DEST's files against its weights-manifest.json")
    wv.add_argument("dest")


def _weights_main(args) -> int:
    from geco import weights
    from geco.storage import StorageError

    try:
        if args.weights_command == "import":
            uri = weights.import_weights(args.src, args.dest, kind=args.kind, overwrite=args.overwrite)
            m = weights.read_manifest(args.dest)
            print(f"imported {len(m['files'])} file(s) from {args.src}; manifest: {uri}")
            for note in m.get("notes", []):
                print(f"  note: {note}")
            return 0
        res = weights.verify_weights(args.dest)
        print(res.summary())
        return 0 if res.ok else 1
    except (weights.WeightsImportError, StorageError, FileNotFoundError) as e:
        return _fail(str(e))


def _load(args) -> GecoConfig:
    overrides = list(args.overrides)
    if getattr(args, "source", None):
        overrides.append(f"source.uri={args.source}")
    if getattr(args, "output", None):
        overrides.append(f"dataset.uri={args.output}")
    return load_config(args.config, overrides)


class _Stderr(logging.StreamHandler):
    """A handler on whatever ``sys.stderr`` is when a record is written (pytest swaps it per test)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it
        pass


def _setup_logging() -> None:
    """The project's warnings and errors on stderr as ``WARNING: ...``; MLflow's notices (e.g.
    creating a sqlite store's tables) only from WARNING up. Ray's own logs are routed by
    :func:`pipelines.cluster.init_ray` when a command starts or joins Ray."""
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow is first imported
    for name in ("geco", "pipelines", "cli"):
        logger = logging.getLogger(name)
        if not any(isinstance(h, _Stderr) for h in logger.handlers):
            handler = _Stderr()
            handler.setLevel(logging.WARNING)
            handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
            logger.addHandler(handler)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _setup_logging()
    if args.command == "weights":
        return _weights_main(args)
    if args.command == "generate":
        return _generate_main(args)
    if args.command == "models":
        return _models_main(args)
    if args.command == "train":
        return _train_main(args)
    if args.command == "run":
        return _run_main(args)
    if args.command == "retrain":
        return _retrain_main(args)
    if args.command == "report":
        return _report_main(args)
    if args.command == "register":
        return _register_main(args)
    if args.command == "evaluate":
        return _evaluate_main(args)
    if args.command == "pseudo-gt":
        return _pseudo_gt_main(args)
    def work() -> int:
        cfg = _load(args)
        if args.command == "config":
            import yaml

            print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        elif args.command == "render":
            from pipelines import render

            _print_summary(render.run(cfg, force=args.force, retry_failed=args.retry_failed).summary())
        return 0

    return _guarded(args.command, work)


if __name__ == "__main__":
    sys.exit(main())

"""The ``geco`` command.

    geco render --config configs/local.yaml [--source URI] [--output URI] [--set k=v ...] [--force]
    geco config --config configs/local.yaml [--set k=v ...]     # print the validated config
    geco generate IMAGE [IMAGE ...] --checkpoint URI -o OUTDIR [--seed S] [--num-samples K] [--device cpu|cuda]
    geco models init-tiny DEST [--set k=v ...]                  # a tiny random checkpoint bundle
    geco train pretrain|stage1 --config configs/local.yaml [--set k=v ...]   # Ray Train (resumes)
    geco run --config configs/local.yaml [--set k=v ...] [--stages render,pretrain]  # the whole DAG

Stages that need Ray are imported lazily from ``pipelines/`` so ``geco --help`` stays fast.
"""
from __future__ import annotations

import argparse
import sys

from geco.config import ConfigError, GecoConfig, load_config


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
    return ap


def _add_run_parser(sub) -> None:
    from pipelines.dag import STAGES  # light: pipelines.dag imports its stages lazily

    d = sub.add_parser("run", help="the whole DAG (render -> pretrain -> stage1) under one MLflow parent run; "
                                   "re-running does only what is missing")
    _add_config_args(d)
    d.add_argument("--stages", metavar="A,B", default=None,
                   help=f"run only these stages, in DAG order (default: all of {','.join(STAGES)})")


def _run_main(args) -> int:
    from pipelines import dag

    try:
        stages = dag.parse_stages(args.stages)  # before any work (and before the config is loaded)
        cfg = load_config(args.config, args.overrides)
        result = dag.run(cfg, stages=stages, progress=lambda text: print(text, flush=True))
        print(result.summary())
        return 0
    except ConfigError as e:
        print(f"geco: config error: {e}", file=sys.stderr)
        return 2
    except dag.StageFailed as e:  # one line for errors users cause; tracebacks for bugs
        code = _report_failure(e.cause, str(e))
        if code is None:
            raise
        return code
    except Exception as e:  # before any stage ran (e.g. the cluster cannot run a training job)
        code = _report_failure(e, str(e))
        if code is None:
            raise
        return code


def _report_failure(err: BaseException, message: str) -> int | None:
    """Print ``message`` as one line and return the exit status for a failure the user can act on
    (2: bad input, config, data, storage or cluster; 1: a training job that failed beyond its
    restarts), or return None for a bug (the caller re-raises: a traceback)."""
    from geco.storage import StorageError

    if isinstance(err, (ConfigError, StorageError, FileNotFoundError)) or type(err).__name__ in (
            "TrainSetupError", "RenderAborted"):
        print(f"geco: {message}", file=sys.stderr)
        return 2
    if type(err).__name__ == "TrainingFailedError":
        print(f"geco: training failed: {message}", file=sys.stderr)
        return 1
    return None


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
                    "pretrained, else pretrain.output_uri's teacher when there)")
    s1.add_argument("--reconstructor", metavar="URI", help="reconstructor .safetensors or pretrain output (default: "
                    "models.reconstructor.pretrained, else pretrain.output_uri's when there)")


def _train_main(args) -> int:
    import importlib

    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"dataset.uri={args.data}")
    if getattr(args, "output", None):
        overrides.append(f"{args.train_stage}.output_uri={args.output}")
    try:
        cfg = load_config(args.config, overrides)
        try:
            stage = importlib.import_module(f"pipelines.{args.train_stage}")
        except ModuleNotFoundError as e:
            if e.name != f"pipelines.{args.train_stage}":
                raise
            print(f"geco: `geco train {args.train_stage}` is not available in this version", file=sys.stderr)
            return 2
        kwargs = {"targets": args.only} if args.train_stage == "pretrain" and args.only else {}
        if args.train_stage == "stage1":
            kwargs["inputs"] = stage.default_inputs(cfg, teacher=args.teacher, reconstructor=args.reconstructor)
        result = stage.run(cfg, **kwargs)
        print(result.summary())
        return 0
    except ConfigError as e:
        print(f"geco: config error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # one line for errors users cause; tracebacks for bugs
        code = _report_failure(e, str(e))
        if code is None:
            raise
        return code


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
    g.add_argument("--tracking-uri", default=None, help="MLflow tracking URI for runs:/ and models:/ checkpoints")


def _generate_main(args) -> int:
    from geco import generate
    from geco.storage import StorageError

    try:
        generate.run(args.images, args.checkpoint, args.output, seed=args.seed, num_samples=args.num_samples,
                     device=args.device, turntable_frames=args.turntable_frames,
                     turntable_size=args.turntable_size, tracking_uri=args.tracking_uri)
        return 0
    except (generate.GenerateError, StorageError, FileNotFoundError) as e:
        print(f"geco: {e}", file=sys.stderr)
        return 2


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
            import yaml

            base = {}
            if args.config:
                from pathlib import Path

                if not Path(args.config).is_file():
                    raise ConfigError(f"{args.config}: config file not found")
                base = (yaml.safe_load(Path(args.config).read_text()) or {}).get("models") or {}
            cfg = bundle.tiny_models_config(args.overrides, base)
            uri = bundle.init_tiny_bundle(args.dest, cfg, seed=args.seed, include_teacher_unet=args.with_teacher_unet)
            print(f"wrote a tiny random GECO checkpoint to {uri} (tiles {cfg.teacher.tile_size}px, "
                  f"reconstructor input {cfg.reconstructor.input_size}px)")
            return 0
        root = bundle.resolve_checkpoint(args.uri, tracking_uri=args.tracking_uri)
        m = bundle.read_manifest(root)
        comps = m.get("components", {})
        print(f"{args.uri} -> {root}\n  format {m['format']} v{m['version']}, created {m.get('created')}")
        for name, c in comps.items():
            extra = {k: v for k, v in c.items() if k not in ("path", "note")}
            print(f"  {name}: {c.get('path')} {extra}" + (f"\n    {c['note']}" if c.get("note") else ""))
        return 0
    except ConfigError as e:
        print(f"geco: config error: {e}", file=sys.stderr)
        return 2
    except (StorageError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"geco: {e}", file=sys.stderr)
        return 2


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
        print(f"geco: {e}", file=sys.stderr)
        return 2


def _load(args) -> GecoConfig:
    overrides = list(args.overrides)
    if getattr(args, "source", None):
        overrides.append(f"source.uri={args.source}")
    if getattr(args, "output", None):
        overrides.append(f"dataset.uri={args.output}")
    return load_config(args.config, overrides)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
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
    try:
        cfg = _load(args)
        if args.command == "config":
            import yaml

            print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
            return 0
        if args.command == "render":
            from pipelines import render

            result = render.run(cfg, force=args.force,
                                retry_failed=args.retry_failed)
            print(result.summary())
            return 0
    except ConfigError as e:
        print(f"geco: config error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a clear one-line reason for errors users cause; tracebacks for bugs
        code = _report_failure(e, str(e))
        if code is None:
            raise
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())

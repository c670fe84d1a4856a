"""The ``geco`` command.

    geco render --config configs/local.yaml [--source URI] [--output URI] [--set k=v ...] [--force]
    geco config --config configs/local.yaml [--set k=v ...]     # print the validated config

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
    return ap


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
        from geco.storage import StorageError

        if isinstance(e, (StorageError, FileNotFoundError)) or type(e).__name__ == "RenderAborted":
            print(f"geco: {e}", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())

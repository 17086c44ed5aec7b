"""`slimserve import` and `slimserve registry list|show|verify|alias|export`.

Imports `slimserve.compression` and `slimserve.registry` only inside the handlers.
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

from slimserve.cli.common import UsageError, open_registry, positive_int, registry_arg

if TYPE_CHECKING:
    from slimserve.registry.store import Registry


def cmd_import(args: argparse.Namespace) -> int:
    from slimserve.compression.importer import DEFAULT_MODEL_NAME, import_default, import_model

    registry = open_registry(args)
    if args.default:
        name = args.name or DEFAULT_MODEL_NAME
        if args.if_missing and registry.versions(name):
            print(_already_imported(registry, name))
            return 0
        art = import_default(registry, name)
    else:
        if not args.source or not args.name:
            raise UsageError("import needs SOURCE and --name (or --default)")
        if args.if_missing and registry.versions(args.name):
            print(_already_imported(registry, args.name))
            return 0
        art = import_model(registry, args.source, args.name, revision=args.revision)
    print(f"imported {art.ref} digest {art.digest[:12]} into {registry.root}")
    return 0


def _already_imported(registry: Registry, name: str) -> str:
    """Names the imported version (the first, which has no parent), not the newest one."""
    versions = registry.versions(name)
    first = registry.get(name, str(versions[0]))
    return (
        f"{first.ref} already imported ({first.digest[:12]}); {name} has {len(versions)} "
        "version(s); skipped"
    )


def cmd_registry(args: argparse.Namespace) -> int:
    from slimserve.registry.store import parse_model_ref

    registry = open_registry(args)
    if args.action == "list":
        return _list(registry, as_json=args.json)
    name, ref = parse_model_ref(args.model)
    if args.action == "show":
        art = registry.get(name, ref)
        print(json.dumps({"digest": art.digest, **art.manifest.to_dict()}, indent=2))
    elif args.action == "export":
        return _export(registry, name, ref, args.version)
    elif args.action == "verify":
        art = registry.get(name, ref)
        art.verify()
        print(f"{art.ref}: {len(art.files)} files OK ({art.digest[:12]})")
    elif args.action == "alias":
        if args.version is None or args.alias is None:
            raise UsageError("usage: slimserve registry alias NAME VERSION ALIAS")
        version = _version(args.version)
        registry.set_alias(name, args.alias, version)
        print(f"{name}@{args.alias} -> {name}@{version}")
    return 0


def _export(registry: Registry, name: str, ref: str, target: str | None) -> int:
    from pathlib import Path

    from slimserve.registry.store import export_version

    if not target:
        raise UsageError("usage: slimserve registry export NAME[@REF] DIR")
    try:
        copy = export_version(registry.get(name, ref), Path(target))
    except FileExistsError as exc:
        raise UsageError(str(exc)) from None
    size = sum(int(f["size"]) for f in copy.files.values())
    print(
        f"exported {name}@{copy.version} to {copy.path} ({len(copy.files)} files, "
        f"{size / 1e6:.1f} MB, digest {copy.digest[:12]}; verified)"
    )
    return 0


def _version(text: str) -> int:
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError as exc:
        raise UsageError(f"argument VERSION: {exc}") from None


def _list(registry: Any, *, as_json: bool) -> int:
    from slimserve.registry.store import describe

    rows = [describe(a, registry.aliases_of(a.name, a.version)) for a in registry.artifacts()]
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'model':32} {'aliases':20} {'parent':28} {'recipe':18} {'size MB':>8}  digest")
    for r in rows:
        print(
            f"{r['ref']:32} {','.join(r['aliases']):20} {r['parent'] or '-':28} "
            f"{(r['recipe'] or {}).get('name', '-'):18} {r['bytes'] / 1e6:8.1f}  "
            f"{r['digest'][:12]}"
        )
    return 0


def add_parser(sub: Any) -> None:
    """Add `import` and `registry` to the top-level subparsers."""
    p = sub.add_parser("import", help="import a base model into the registry")
    p.add_argument("source", nargs="?", help="HF model directory, .gguf file, or hub id")
    p.add_argument("--name", help="registry name for the model")
    p.add_argument("--default", action="store_true", help="import SmolLM2-135M-Instruct")
    p.add_argument("--revision", help="hub revision (hub ids only)")
    p.add_argument("--if-missing", action="store_true", help="do nothing if NAME exists")
    registry_arg(p)
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("registry", help="list, show, verify, alias and export registry versions")
    p.add_argument("action", choices=["list", "show", "verify", "alias", "export"])
    p.add_argument("model", nargs="?", default="", help="NAME[@VERSION|@ALIAS]")
    p.add_argument(
        "version",
        nargs="?",
        help="(alias) version number; (export) the directory to write, new or empty",
    )
    p.add_argument("alias", nargs="?", help="(alias) alias name")
    p.add_argument("--json", action="store_true")
    registry_arg(p)
    p.set_defaults(func=cmd_registry)

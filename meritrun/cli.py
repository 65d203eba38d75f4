"""The `meritrun` command line: the presentation layer over the pipeline and the stages.

Heavy subcommands (profile, merge, eval, search, contribute) live in the images' packages
and are imported only when called, so `meritrun validate` works with the core alone.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path

from .clihelp import DefaultsHelpFormatter
from .errors import MeritRunError

# Subcommands implemented in the trainer/merger packages: name -> (module:function, help).
DELEGATED = {
    "profile": ("merit_trainer.profiling.cli:main", "profile gradient conflicts, write a plan"),
    "merge": ("merit_merger.cli_merge:main", "merge partition artifacts into one model"),
    "eval": ("merit_merger.cli_eval:main", "held-out scores of a model (or several side by side)"),
    "compare": ("merit_merger.cli_eval:compare_main",
                "did it help? held-out loss and accuracy per source of several models"),
    "search": ("merit_merger.cli_search:main", "rank data mixtures by merging experts"),
    "contribute": ("merit_trainer.contribute:main", "train and upload a site's partition"),
    "keygen": ("meritrun.keys:main", "create a site's ed25519 manifest-signing key"),
}


def _delegate(target: str, argv: list[str]) -> int:
    module, func = target.split(":")
    try:
        entry = getattr(importlib.import_module(module), func)
    except ImportError as e:
        print(f"error: this subcommand needs the trainer/merger extras "
              f"(pip install 'meritrun[train,merge]'): {e}", file=sys.stderr)
        return 2
    return int(entry(argv) or 0)


def positive_int(text: str) -> int:
    """argparse type for counts that must be at least 1 (e.g. --parallel)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def cmd_validate(args: argparse.Namespace) -> int:
    from .api import MeritRunSpec
    from .validation import document_errors, missing_local_paths, run_documents

    failed = 0
    for path in args.files:
        try:
            runs = run_documents(Path(path))
        except MeritRunError as e:
            print(e, file=sys.stderr)  # the error names the file already
            failed += 1
            continue
        if not runs:
            print(f"{path}: no MeritRun document", file=sys.stderr)
            failed += 1
        for doc in runs:
            name = (doc.get("metadata") or {}).get("name", "?")
            errors = document_errors(doc)
            if not errors and not args.no_path_check:
                spec = MeritRunSpec.model_validate(doc["spec"], by_alias=True, by_name=False)
                errors = missing_local_paths(spec, base=Path(path).resolve().parent)
            for err in errors:
                print(f"{path}: {name}: {err}", file=sys.stderr)
            failed += bool(errors)
            if not errors:
                print(f"{path}: {name}: valid")
    return 1 if failed else 0


def cmd_crd(args: argparse.Namespace) -> int:
    from .crd import render_crd_yaml

    sys.stdout.write(render_crd_yaml())
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .runner_cli import run_file

    if not args.local:
        print("error: without a cluster use --local; on Kubernetes: kubectl apply -f FILE",
              file=sys.stderr)
        return 2
    return run_file(Path(args.file), workdir=Path(args.workdir), parallel=args.parallel,
                    fresh=args.fresh)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(Path(args.workdir), strategy=args.strategy, parallel=args.parallel)


VERBOSE_FLAGS = ("-v", "--verbose")
_HELP = DefaultsHelpFormatter  # --help shows every default


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meritrun", description=__doc__.splitlines()[0],
                                     formatter_class=_HELP)
    parser.add_argument(*VERBOSE_FLAGS, action="store_true",
                        help="debug logging (before or after the subcommand)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="tiny model + synthetic mixture, end to end, locally",
                       formatter_class=_HELP)
    p.add_argument("--workdir", default="meritrun-demo", help="where everything is written")
    p.add_argument("--strategy", default="conflictPCA",
                   choices=["conflictPCA", "random", "manual"], help="split strategy")
    p.add_argument("--parallel", type=positive_int, default=1, help="stage processes at once")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("run", help="run a MeritRun YAML end to end", formatter_class=_HELP)
    p.add_argument("file", help="the MeritRun YAML")
    p.add_argument("--local", action="store_true", help="run on this machine (no cluster)")
    p.add_argument("--workdir", default="meritrun-work", help="status, artifacts and logs")
    p.add_argument("--parallel", type=positive_int, default=1, help="stage processes at once")
    p.add_argument("--fresh", action="store_true",
                   help="start over in this workdir: a new run (new uid), the old status and "
                        "logs moved to WORKDIR/previous/ (without it, a workdir resumes only "
                        "the run it holds, with the same spec)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("validate", help="check MeritRun YAML as the cluster would, and that "
                       "its local files exist", formatter_class=_HELP)
    p.add_argument("files", nargs="+", help="YAML files")
    p.add_argument("--no-path-check", action="store_true",
                   help="do not check that local paths exist (e.g. a spec for another machine)")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("crd", help="print the CustomResourceDefinition")
    p.set_defaults(func=cmd_crd)

    for name, (_, help_text) in DELEGATED.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def split_verbose(argv: list[str]) -> tuple[bool, list[str]]:
    """-v/--verbose anywhere on the line (before `--`), taken out so every subcommand,
    delegated ones included, sees the rest unchanged."""
    end = argv.index("--") if "--" in argv else len(argv)
    verbose = any(a in VERBOSE_FLAGS for a in argv[:end])
    rest = [a for a in argv[:end] if a not in VERBOSE_FLAGS] + argv[end:]
    return verbose, rest


def main(argv: list[str] | None = None) -> int:
    verbose, argv = split_verbose(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if argv and argv[0] in DELEGATED:
        return _delegate(DELEGATED[argv[0]][0], argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MeritRunError as e:
        print(f"error: {e}", file=sys.stderr)  # SpecError's text already names the field
        return 2
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

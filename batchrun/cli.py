"""The command line: parse arguments, call the library, print, and map errors to exit codes.

`main(argv) -> int` is what the console script and the tests call; nothing here holds logic that a
library user would need.
"""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from batchrun import __version__
from batchrun.errors import BatchrunError, ManifestError, OutputDirLocked, Problem, UsageError
from batchrun.manifest import load_manifest

EXIT_OK, EXIT_NOT_DONE, EXIT_USAGE, EXIT_AUTH, EXIT_LOCKED, EXIT_INTERRUPTED = 0, 1, 2, 3, 75, 130
MAX_PROBLEMS_SHOWN = 50


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse exits 2 by itself; keep that, but through UsageError
        raise UsageError(f"{message} (see 'batchrun {self.prog.split()[-1]} --help')"
                         if " " in self.prog else message)


def _print_problems(problems: list[Problem], out: TextIO, shown_so_far: int = 0) -> int:
    """Print up to the cap of problems; returns how many were printed."""
    room = max(0, MAX_PROBLEMS_SHOWN - shown_so_far)
    for problem in problems[:room]:
        print(problem, file=out)
    return min(room, len(problems))


def _summary(problems: list[Problem]) -> str:
    errors = sum(p.severity == "error" for p in problems)
    warnings = len(problems) - errors
    parts = [plural(errors, "error")] + ([plural(warnings, "warning")] if warnings else [])
    return ", ".join(parts)


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' * (n != 1)}"


def cmd_validate(args, out: TextIO, err: TextIO) -> int:
    status, shown = EXIT_OK, 0
    for path in args.manifests:
        try:
            manifest = load_manifest(path)
        except ManifestError as exc:
            status = EXIT_USAGE
            shown += _print_problems(exc.problems, out, shown)
            hidden = len(exc.problems) - min(len(exc.problems), MAX_PROBLEMS_SHOWN)
            more = f" (first {MAX_PROBLEMS_SHOWN} shown)" if hidden > 0 else ""
            print(f"{path}: invalid: {_summary(exc.problems)}{more}", file=out)
            continue
        shown += _print_problems(manifest.warnings, out, shown)
        note = f", {_summary(manifest.warnings).split(', ')[-1]}" if manifest.warnings else ""
        print(f"{path}: ok, {plural(len(manifest.jobs), 'job')}{note}", file=out)
    return status


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="batchrun", description="Run batches of image-to-video jobs on RunComfy's Model API.")
    parser.add_argument("--version", action="version", version=f"batchrun {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    validate = commands.add_parser("validate", help="check manifests offline; exit 0 valid, 2 invalid")
    validate.add_argument("manifests", nargs="+", metavar="MANIFEST")
    validate.set_defaults(handler=cmd_validate)
    return parser


def main(argv: list[str] | None = None, *, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    out, err = stdout or sys.stdout, stderr or sys.stderr
    try:
        args = build_parser().parse_args(argv)
        if not getattr(args, "handler", None):
            build_parser().print_help(out)
            return EXIT_USAGE
        return args.handler(args, out, err)
    except ManifestError as exc:
        _print_problems(exc.problems, err)
        print(f"{exc.problems[0].file}: invalid manifest: {_summary(exc.problems)}; nothing was sent", file=err)
        return EXIT_USAGE
    except OutputDirLocked as exc:
        print(f"batchrun: {exc}", file=err)
        return EXIT_LOCKED
    except UsageError as exc:
        print(f"batchrun: {exc}", file=err)
        return EXIT_USAGE
    except BatchrunError as exc:
        print(f"batchrun: {exc}", file=err)
        return EXIT_NOT_DONE
    except SystemExit as exc:  # --help and --version
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    except KeyboardInterrupt:
        print("batchrun: interrupted", file=err)
        return EXIT_INTERRUPTED

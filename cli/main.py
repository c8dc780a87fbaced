"""The `moe` command line. Every failure the user can fix is one line on stderr and a non-zero exit.

The commands live in one module per group (cli.experts, cli.routers, cli.service). Nothing heavy is imported
here: each command imports what it uses, checks what needs no model first, and loads the backbone last.
"""

from __future__ import annotations

import argparse
import sys

from pydantic import ValidationError

from cli import experts, routers, service
from cli.args import common_options, verbose_option
from cli.context import BackboneLoader, Context
from cli.logs import configure_logging
from core.errors import InvalidInputError, MoEError
from core.settings import Settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe", description="Mixture-of-LoRA-experts service.",
        epilog="Answers go to stdout (`--json` on the list commands for scripts); warnings, errors and the "
               "progress of long work go to stderr.")
    verbose_option(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    common = common_options()
    service.add_service_parsers(sub, common)
    experts.add_parsers(sub, common)
    routers.add_parsers(sub, common)
    service.add_model_parsers(sub, common)
    return parser


def _settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:  # a bad MOE_* variable: one line naming it, not a traceback
        problems = "; ".join(f"{'MOE_' + '_'.join(map(str, e['loc'])).upper() if e['loc'] else 'settings'}: "
                             f"{e['msg']}" for e in exc.errors())
        raise InvalidInputError(f"Bad setting in the environment: {problems}.") from exc


def main(argv: list[str] | None = None, *, load_backbone: BackboneLoader | None = None) -> int:
    """`load_backbone` replaces the real loader (tests check that refusals never reach it)."""
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    try:
        return args.func(Context(_settings(), load_backbone), args) or 0
    except MoEError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

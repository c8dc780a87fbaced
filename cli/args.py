"""Argument types and the options every command accepts, so argparse refuses bad values before any work."""

from __future__ import annotations

import argparse


def positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {number}")
    return number


def positive_float(value: str) -> float:
    number = float(value)
    if not number > 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be more than 0, not {value}")
    return number


def verbose_option(parser: argparse.ArgumentParser, default: object = 0) -> None:
    parser.add_argument("-v", "--verbose", action="count", default=default,
                        help="show the libraries' INFO logging too (alembic, MLflow, Ray, progress bars of model "
                             "loading); -vv: DEBUG")


def common_options() -> argparse.ArgumentParser:
    """Options a command accepts after its name too (`moe expert list -v`). SUPPRESS keeps a subcommand from
    overwriting the value given before it (`moe -v expert list`)."""
    common = argparse.ArgumentParser(add_help=False)
    verbose_option(common, default=argparse.SUPPRESS)
    return common

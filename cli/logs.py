"""Logging for the `moe` command: quiet by default, the libraries' INFO lines back with `--verbose`.

Without `--verbose` stderr carries warnings and errors (from anyone), our own progress lines for long work
(training, encoding) and the progress bars of that work; library INFO chatter (alembic migrations, MLflow,
transformers' weight-loading bar, Ray) stays hidden. stdout carries only the command's answer.
"""

from __future__ import annotations

import logging
import os
import sys

PRODUCT_LOGGERS = ("moe", "cli", "core", "experts", "pipelines", "registry", "router", "serving", "api")
"""Our packages' loggers: their INFO lines report progress of long work and stay on in quiet mode."""

VERBOSE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

QUIET_LIBRARY_ENV = {
    # Both are read when the library is imported (MLflow also re-levels alembic then), so they must be set
    # before any command imports it; child processes (a local Ray head) inherit the same quiet setting.
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}


class QuietFormatter(logging.Formatter):
    """Our progress lines read as plain sentences; anything worse than INFO says what it is, like the CLI's own
    `error: ...` lines."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return message if record.levelno <= logging.INFO else f"{record.levelname.lower()}: {message}"


def configure_logging(verbosity: int) -> None:
    """0: quiet (see the module doc); 1: every logger at INFO; 2 or more: DEBUG."""
    handler = logging.StreamHandler(sys.stderr)
    if verbosity > 0:
        handler.setFormatter(logging.Formatter(VERBOSE_FORMAT))
        logging.basicConfig(level=logging.DEBUG if verbosity > 1 else logging.INFO, handlers=[handler], force=True)
        for name in PRODUCT_LOGGERS:
            logging.getLogger(name).setLevel(logging.NOTSET)
        return
    for key, value in QUIET_LIBRARY_ENV.items():
        os.environ.setdefault(key, value)  # an explicit setting in the environment wins
    handler.setFormatter(QuietFormatter("%(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True)
    for name in PRODUCT_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO)

"""Training logger: coloured console on rank 0, one plain-text file per rank."""
from __future__ import annotations

import logging
import os
import sys
from typing import Optional

from termcolor import colored

__all__ = ['create_logger', 'safe_text']

_FILE_FORMAT = '[%(asctime)s %(name)s] (%(filename)s %(lineno)d): %(levelname)s %(message)s'
_DATE_FORMAT = '%Y-%m-%d %H:%M:%S'
# Marks the handlers this module attached, so a second call replaces them instead of doubling.
_OWNED = '_dat_create_logger'


def safe_text(text: str) -> str:
    """``text`` with what cannot be written as UTF-8 escaped: file names that are not UTF-8 (Python
    holds their bytes as lone surrogates) show those bytes as ``\\xe9``, so that they can be printed,
    logged and written anywhere instead of raising UnicodeEncodeError."""
    try:
        text.encode('utf-8')
        return text
    except UnicodeEncodeError:
        pass
    try:
        return text.encode('utf-8', 'surrogateescape').decode('utf-8', 'backslashreplace')
    except UnicodeEncodeError:      # surrogates that are not escaped bytes
        return text.encode('utf-8', 'backslashreplace').decode('utf-8')


def _safe_record(record: logging.LogRecord) -> bool:
    """Handler filter: the record's message made safe to write (see :func:`safe_text`)."""
    message = record.getMessage()
    safe = safe_text(message)
    if safe is not message:
        record.msg, record.args = safe, None
    return True


class _ColorFormatter(logging.Formatter):
    """Green time, yellow source location, red level name for warnings and errors."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = colored(f"[{self.formatTime(record, _DATE_FORMAT)} {record.name}]", 'green')
        where = colored(f"({record.filename} {record.lineno})", 'yellow')
        level = record.levelname
        if record.levelno >= logging.WARNING:
            level = colored(level, 'red', attrs=['bold'])
        message = record.getMessage()
        if record.exc_info:
            message = f"{message}\n{self.formatException(record.exc_info)}"
        return f"{prefix} {where}: {level} {message}"


def _console_wanted(record: logging.LogRecord) -> bool:
    """Records logged with ``extra={'console': False}`` (e.g. the full config) go to the file only."""
    return getattr(record, 'console', True)


def create_logger(output_dir: Optional[str], dist_rank: int = 0, name: str = '',
                  capture_warnings: bool = False) -> logging.Logger:
    """Return the logger ``name`` writing to ``<output_dir>/log_rank{dist_rank}.txt`` (appended, so a
    resumed run continues its file; no file when ``output_dir`` is None) and, on rank 0 only, to
    stdout in colour.

    ``capture_warnings`` routes Python warnings to the same handlers, so that they sit in the log
    with the rest instead of on stderr. Calling it again in the same process (e.g. with another
    ``output_dir``) replaces the handlers it attached before rather than adding more.
    """
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO)
    handlers = []
    if dist_rank == 0:
        console = logging.StreamHandler(sys.stdout)
        console.setFormatter(_ColorFormatter())
        console.addFilter(_console_wanted)
        console.addFilter(_safe_record)
        handlers.append(console)
    if output_dir is not None:
        os.makedirs(output_dir, exist_ok=True)
        log_file = logging.FileHandler(os.path.join(output_dir, f'log_rank{dist_rank}.txt'), mode='a')
        log_file.setFormatter(logging.Formatter(_FILE_FORMAT, datefmt=_DATE_FORMAT))
        log_file.addFilter(_safe_record)
        handlers.append(log_file)

    targets = [logger]
    if capture_warnings:
        logging.captureWarnings(True)
        targets.append(logging.getLogger('py.warnings'))
    for target in targets:
        if target.name:
            # A named logger should not print a second time through the root logger's handlers.
            target.propagate = False
        for handler in [h for h in target.handlers if getattr(h, _OWNED, False)]:
            target.removeHandler(handler)
            if handler not in handlers:
                handler.close()
        for handler in handlers:
            setattr(handler, _OWNED, True)
            target.addHandler(handler)
    return logger

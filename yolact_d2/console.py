"""What the project's entry points print: dependency noise filtered, colour only on a terminal, and
the main job's short console.

Imported first by ``yolact_d2/__init__.py``, so that the two filters below are in place before
detectron2 or fvcore is imported by anything that imports the package first (every entry point
does):

- fvcore and detectron2 call ``torch.jit.script`` at import time, and torch deprecates it with a
  ``FutureWarning`` per call that says nothing about this program. Only that message from that
  module is hidden; the project's own warnings stay.
- ``torch.utils.cpp_extension`` (imported by detectron2's environment report and by
  ``torch.utils.benchmark``) logs "No CUDA runtime is found, using CUDA_HOME=..." on every CPU
  machine; its logger is raised to ERROR.
"""
import argparse
import contextlib
import io
import logging
import re
import warnings
from typing import Dict, Iterator, Optional, Sequence

__all__ = ["HelpFormatter", "plain_files_and_pipes", "prints_to_log", "quiet_console", "QUIET_CONSOLE"]

warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning,
                        module=r"torch\.jit\._script")
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)

# ANSI SGR sequences: detectron2's colourful console formatter and its pygments-highlighted config dump.
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# The loggers whose handlers detectron2 sets up (setup_logger) or this project does.
LOGGERS = ("detectron2", "fvcore", "yolact_d2")

# The main job's console at INFO: logger name -> message prefix shown (None: every message).
# WARNING and above always show; everything still goes to OUTPUT_DIR/log.txt.
QUIET_CONSOLE: Dict[str, Optional[str]] = {
    "yolact_d2.prior_fit": None,           # the prior fit: coverage tables and the fitted priors
    "yolact_d2.data.custom": None,         # a COCO JSON's classes
    "yolact_d2.checkpoint": None,          # what a loaded checkpoint brought
    "detectron2.data.build": "Distribution of instances",  # the dataset summary
    "detectron2.utils.events": None,       # the iteration lines
    "detectron2.evaluation.coco_evaluation": "Evaluation results for",  # one AP table per task
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` of every entry point: the description and examples as written (line breaks and
    ``\\`` continuations kept), and each option's default after its help."""


class _PlainFormatter(logging.Formatter):
    """The handler's own formatter with ANSI colour codes removed (for files and pipes)."""

    def __init__(self, inner: logging.Formatter):
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        return _ANSI.sub("", self.inner.format(record))


def _is_terminal(handler: logging.Handler) -> bool:
    stream = getattr(handler, "stream", None)
    try:
        return bool(stream is not None and stream.isatty())
    except (ValueError, AttributeError):  # a closed stream
        return False


def _console_handlers(logger: logging.Logger) -> Iterator[logging.StreamHandler]:
    import sys

    for h in logger.handlers:
        if isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) in (sys.stdout, sys.stderr):
            yield h


def plain_files_and_pipes(loggers: Sequence[str] = LOGGERS) -> None:
    """Strip colour codes from every handler of ``loggers`` whose stream is not a terminal
    (``OUTPUT_DIR/log.txt`` and a redirected console), after detectron2's ``setup_logger`` /
    ``default_setup`` made them, and keep the tracebacks of a user's mistake (a
    :class:`~yolact_d2.errors.YolactUserError`) off the console (log.txt keeps them). Idempotent."""
    for name in loggers:
        for h in logging.getLogger(name).handlers:
            if not _is_terminal(h) and h.formatter is not None and not isinstance(h.formatter, _PlainFormatter):
                h.setFormatter(_PlainFormatter(h.formatter))
        for h in _console_handlers(logging.getLogger(name)):
            if not any(isinstance(f, _NoUserErrorTraceback) for f in h.filters):
                h.addFilter(_NoUserErrorTraceback())


class _NoUserErrorTraceback(logging.Filter):
    """Drops, on the console, the record of a user's mistake that came with its traceback
    (detectron2's "Exception during training:"): the entry point prints it as one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        from .errors import YolactUserError

        return not (record.exc_info and isinstance(record.exc_info[1], YolactUserError))


class _QuietFilter(logging.Filter):
    def __init__(self, shown: Dict[str, Optional[str]]):
        super().__init__()
        self.shown = shown

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        for name, prefix in self.shown.items():
            if record.name == name or record.name.startswith(name + "."):
                return prefix is None or str(record.msg).startswith(prefix)
        return False


class _LogLines(io.TextIOBase):
    """A text stream that sends each printed line to ``logger`` at INFO (pycocotools' prints)."""

    def __init__(self, logger: logging.Logger):
        self.logger, self._buffer = logger, ""

    def write(self, text: str) -> int:
        self._buffer += text
        *lines, self._buffer = self._buffer.split("\n")
        for line in lines:
            if line.strip():
                self.logger.info(line)
        return len(text)

    def flush(self) -> None:
        if self._buffer.strip():
            self.logger.info(self._buffer)
        self._buffer = ""


def quiet_console(shown: Dict[str, Optional[str]] = QUIET_CONSOLE, loggers: Sequence[str] = LOGGERS) -> None:
    """From now on, the console handlers of ``loggers`` show only ``shown`` (see
    :data:`QUIET_CONSOLE`) and warnings; their log files still get everything. For a process of
    its own (tools/main_job.py), after its loggers were set up."""
    quiet = _QuietFilter(shown)
    for name in loggers:
        for h in _console_handlers(logging.getLogger(name)):
            if not any(isinstance(f, _QuietFilter) for f in h.filters):
                h.addFilter(quiet)


@contextlib.contextmanager
def prints_to_log(logger_name: str = "detectron2.stdout"):
    """Within the block, plain ``print`` output (pycocotools' evaluation summary) goes to the
    logger ``logger_name`` at INFO, a line a record, instead of ``sys.stdout``: with
    :func:`quiet_console`, to ``OUTPUT_DIR/log.txt`` only. ``sys.stdout`` is restored on leaving."""
    prints = _LogLines(logging.getLogger(logger_name))
    try:
        with contextlib.redirect_stdout(prints):
            yield
    finally:
        prints.flush()

"""The project's exception types for a user's mistakes.

Entry points (``train_net.py``, ``demo/demo.py``, ``tools/``) print a :class:`YolactUserError` as one
line without a traceback; any other exception is a bug and keeps its traceback. Each subclass also
derives from the built-in type callers already catch (``ValueError``, ``FileNotFoundError``, ...).
"""

import sys

__all__ = ["YolactUserError", "ConfigError", "DatasetError", "MissingFileError", "DeviceUnavailableError", "run_main"]


class YolactUserError(Exception):
    """A mistake in what the user gave (config, files, data, checkpoint, device); the message is one
    line that names the problem and the fix."""


class ConfigError(YolactUserError, ValueError):
    """A config value the model or the data pipeline cannot use (the message names the key)."""


class DatasetError(YolactUserError, ValueError):
    """A dataset that cannot be trained or evaluated on: unregistered name, malformed JSON,
    annotations the config cannot hold, classes that do not fit NUM_CLASSES."""


class MissingFileError(YolactUserError, FileNotFoundError):
    """A file or folder named by the config or the command line that does not exist."""


class DeviceUnavailableError(YolactUserError, RuntimeError):
    """An explicitly requested device (e.g. ``--device cuda``) that this machine does not have."""


def run_main(main, prog: str, exit_code: int = 2):
    """Run an entry point's ``main()`` as a command: a :class:`YolactUserError` prints
    ``"<prog>: error: <message>"`` as one line on stderr and exits with ``exit_code``; an ``int``
    result is the exit status; any other exception propagates with its traceback (a bug)."""
    try:
        result = main()
    except YolactUserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(exit_code)
    sys.exit(result if isinstance(result, int) else 0)

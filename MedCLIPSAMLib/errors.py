"""Errors that reach the user as one clear sentence (the CLI prints them without a traceback)."""


class MedCLIPSAMError(Exception):
    """A problem the user can fix: bad input, a missing model file, an unwritable output."""


class Cancelled(Exception):
    """The run was cancelled (Ctrl-C, SIGTERM, or a cancel token); nothing was written."""


def require(condition, message):
    """Raise MedCLIPSAMError(message) unless condition holds."""
    if not condition:
        raise MedCLIPSAMError(message)


def optional_import(module, extra, feature):
    """Import an optional dependency, or explain which extra installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MedCLIPSAMError(
            f"{feature} needs the Python package '{module}', which is not installed; "
            f"install it with: pip install 'medclipsam[{extra}]'"
        ) from exc

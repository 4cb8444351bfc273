"""The one base class of every error that means "the user's input cannot be used as given".

Each subclass message says what is wrong with which input and ends with how to fix it. Command-line runs print only
that message (see :func:`custom.user_inputs.install_error_hook`); the MONAI Label app answers it with a 4xx status.
"""

from __future__ import annotations

__all__ = ["InputError", "find_input_error"]


class InputError(Exception):
    """An input (file, prompt, option, output folder, checkpoint) that cannot be used; the message names the fix."""


def find_input_error(error: BaseException | None) -> InputError | None:
    """The first :class:`InputError` in the chain of causes and contexts of ``error`` (MONAI wraps errors of config
    expressions in ``RuntimeError``), or None."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, InputError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


class OutputExistsError(InputError, FileExistsError):
    """An output file exists already and ``overwrite`` was not requested."""

    def __init__(self, path):
        super().__init__(
            f"Output file '{path}' exists already; it is left untouched. "
            "Choose another output folder, or replace it with --overwrite true (overwrite=True in Python)."
        )
        self.path = str(path)


class ProtectedInputError(InputError, ValueError):
    """An output path that points at an input file."""

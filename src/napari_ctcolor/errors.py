"""Errors raised by napari-ctcolor.

They sit below every layer (io, models, engines and the front ends all raise them, and none of them needs
another layer to do so); the CLI turns `InputError` into one ``error: ...`` line and exit code 2.
"""

from __future__ import annotations


class CTColorError(Exception):
    """Base class of all napari-ctcolor errors."""


class Cancelled(CTColorError):
    """The user cancelled a running job; the engine stopped between two steps and returned nothing."""


class InputError(CTColorError):
    """Something the user can fix: a bad file, a wrong modality, mismatched dimensions.

    The message is one line that names the file (when there is one) and the problem.
    """

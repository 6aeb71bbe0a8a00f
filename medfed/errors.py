"""One base class for medfed's input errors.

Anything a user can fix (a wrong config key, a missing or corrupt file, a bad site
folder, an unknown model or dataset name, a malformed checkpoint) raises a subclass of
:class:`MedfedError`. The CLI prints those as one line and exits non-zero; anything else
is a bug and keeps its traceback. Messages name the thing, say what was expected, what
was found and what to do. Something legal but likely unintended warns with a
:class:`MedfedWarning`, which the CLI prints as one line too.
"""

from __future__ import annotations

__all__ = ["MedfedError", "MedfedWarning"]


class MedfedError(ValueError):
    """An input error the user can fix; its message is one line.

    Subclasses ``ValueError`` so that callers catching ``ValueError`` keep working.
    """


class MedfedWarning(UserWarning):
    """Legal input that is likely not what the user meant; its message is one line."""

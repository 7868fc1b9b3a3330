"""The one error type for user mistakes (a bad setting, a missing file, a prompt that cannot fit).

The CLI prints any of them as a single ``r1v3: error:`` line, however deep in a stage's set-up it
was raised; everything else is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """A mistake the user can fix; the message says how."""


class BackboneError(UserError):
    """A model, processor or freeze-plan setting the user can fix; its message says how."""

"""The one base of errors a user causes and can fix (bad input, a busy output folder, a model that cannot be
loaded): jobs print their message on one line and exit with status 2, without a traceback."""


class UserError(ValueError):
    """Input or state the user must fix; its message names what and where."""

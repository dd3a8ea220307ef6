"""The one base of errors a user causes and can fix (bad input, a busy output folder, a model that cannot be
loaded): jobs print their message on one line and exit with status 2, without a traceback."""


class UserError(ValueError):
    """Input or state the user must fix; its message names what and where."""


class IncompleteRun(UserError):
    """A run that started, committed what it could, and could not finish: some inputs were set aside (bad or
    half-written files: exit status 2) or the output's storage is full (exit status 3: free space and run
    again, the rest is scored then). `summary` is what the job prints and writes as for a complete run, its
    `status` saying which."""

    OUTPUT_FULL = 3  # the exit status of a run stopped by a full output (2: bad input, as every UserError)

    def __init__(self, message: str, summary: dict, exit_code: int = 2) -> None:
        super().__init__(message)
        self.summary = summary
        self.exit_code = exit_code

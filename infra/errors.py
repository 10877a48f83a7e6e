"""The one exception type a user sees: a one-line message that says what to do next."""


class TrainrigError(Exception):
    """A failure the user can fix; the Fabric tasks print it as one line and exit non-zero."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code

"""User-facing errors.

Anything a user can cause (a bad path, an unreadable file, an empty folder) raises a
`ScanomalyError`; the CLI prints its message and exits with status 2, without a traceback.
Programming errors stay ordinary exceptions so they are not hidden.
"""


class ScanomalyError(Exception):
    """An error caused by the user's input, with a message that says what to do."""


class ImageReadError(ScanomalyError):
    """One file could not be read as an image. Runs over many files skip these and report them."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class TrainingDiverged(ScanomalyError):
    """Training produced NaN/inf losses; the last good checkpoint is kept."""

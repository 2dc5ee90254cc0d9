"""The one exception type for bad user input, and how the scripts report it."""
import sys


class UserError(Exception):
    """Bad input from the user: printed as one line, exit status 2, no traceback."""

    def __init__(self, message: str):
        # A value quoted from the input may hold line breaks; the message stays one line.
        super().__init__(str(message).replace("\r", "\\r").replace("\n", "\\n"))


def exit_with(error: UserError) -> None:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)

"""The one exception type for bad user input, and how the scripts report it."""
import sys


class UserError(Exception):
    """Bad input from the user: printed as one line, exit status 2, no traceback."""


def exit_with(error: UserError) -> None:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)

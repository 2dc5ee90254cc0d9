"""The one way tunebench fails on bad input: a UserError, raised anywhere, reported by `command` as
one `error:` line and exit status 2, with no traceback.

Every command of the library (train.py, evaluate.py, `evaluate.py report`, `python -m
tunebench.compare`, `python -m tunebench.demo`) decorates its main() with `command` and parses its
arguments with `ArgumentParser`, whose usage errors are UserErrors too. Under several processes
(`accelerate launch`, `torchrun`) every process checks the same input, so every process exits
with status 2; the launcher then reports the failed processes in its own words after the line.
"""
import argparse
import functools
import sys


class UserError(Exception):
    """Bad input from the user: printed as one line, exit status 2, no traceback."""

    def __init__(self, message: str):
        # A value quoted from the input may hold line breaks; the message stays one line.
        super().__init__(str(message).replace("\r", "\\r").replace("\n", "\\n"))


def exit_with(error: UserError) -> None:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)


def command(main):
    """Decorate a command's main(): a UserError it raises ends the process with one line, status 2."""

    @functools.wraps(main)
    def run(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            exit_with(e)

    return run


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are reported as bad input (one line, exit status 2), ending with
    the command's short usage. Like argparse's own error(), it exits at once, so it works inside
    and outside `command`."""

    def __init__(self, *args, usage_hint: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.usage_hint = usage_hint

    def error(self, message):
        exit_with(UserError(f"{message} (usage: {self.usage_hint})"))

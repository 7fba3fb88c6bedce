"""The command line of train.py, sample.py and fid.py: argparse whose errors are one line naming
the flag (`train.py: error: --lr must be positive and finite, not 0`, exit status 2), and the
checks of ranges and paths that the scripts share.
"""
import argparse
import contextlib
import os


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line, `prog: error: message`, exit status 2 (usage: --help)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def at_least(low, what):
    """A row of a range table: (test, what the flag accepts)."""
    return lambda v: v >= low, what


def check_ranges(args, parser, table):
    """Every flag of `table` ({name: (test, what it accepts)}) that is given passes its test, or
    parser.error names it: `--name must be what, not value`."""
    for name, (accepts, what) in table.items():
        value = getattr(args, name)
        if value is not None and not accepts(value):
            shown = value if isinstance(value, int) else f"{value:g}"
            parser.error(f"--{name.replace('_', '-')} must be {what}, not {shown}")


def check_exist(parser, paths):
    """Each (flag, path) whose path is given exists, or parser.error names it."""
    for flag, path in paths:
        if path is not None and not os.path.exists(path):
            parser.error(f"{flag} {path}: no such file or folder")


def nearest_existing(path):
    """`path` if it exists, else its nearest existing parent folder (where it would be created)."""
    while not os.path.exists(path):
        path = os.path.dirname(os.path.abspath(path))
    return path


@contextlib.contextmanager
def input_errors(parser):
    """A SystemExit(message) raised inside (data, a checkpoint, a VAE or a setting that cannot be
    used) ends the program as the parser's errors do: `prog: error: message`, exit status 2."""
    try:
        yield
    except SystemExit as e:
        if not isinstance(e.code, str):
            raise
        parser.error(e.code)

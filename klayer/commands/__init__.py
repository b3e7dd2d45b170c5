"""One module per ``klayer`` command; see klayer/cli.py."""

from klayer.nn import checks


def checked(check, name, parse=float):
    """argparse type: the text parsed (a float unless told), then checked; a bad value is
    a one-line error naming the flag."""
    return checks.flag_type(check, name, parse)

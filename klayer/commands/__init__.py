"""One module per ``klayer`` command; see klayer/cli.py."""

"""The one exception type for input a user can get wrong.

:class:`UserError` is raised where input is checked (a config value, a flag, a file, a
data set, an array passed to the Python API) with one line that names what is wrong and
says what to do. The command line turns it, and only it, into ``klayer <command>:
error: …`` with exit status 2; any other exception is a bug in klayer. It is a
``ValueError``, so code that catches ``ValueError`` keeps working.
"""


class UserError(ValueError):
    """Input the user can fix: the message is one line that says how."""

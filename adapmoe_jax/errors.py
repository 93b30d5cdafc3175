"""The error type for bad user input, reported by the command-line tools as one line."""


class UserInputError(ValueError):
    """Raised for input a user can fix: a bad flag, file, config or prompt.

    The message names the value and tells the user what to do next. The command-line tools
    print it on one line and exit with status 2, without a traceback.
    """

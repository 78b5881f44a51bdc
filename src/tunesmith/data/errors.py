"""`DataError`: a problem with the user's data (a file, a column, an example), worded for the user."""


class DataError(ValueError):
    """A problem with the user's data, worded for the user: what, where, and how to fix it."""

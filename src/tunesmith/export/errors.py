"""The one error type of the export package."""


class ExportError(ValueError):
    """A model that cannot be exported as asked; the message says why and what to do."""

"""The one exception type that the CLI turns into a single clear error line."""


class MedgenError(Exception):
    """A known, user-facing error (bad input, missing file, refused output folder).

    The message must be one line that names the file, row or key at fault.
    """

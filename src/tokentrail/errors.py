"""The one exception family the CLI turns into a one-line message and exit code 2."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name if it has none): errors stay one line."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class TokentrailError(Exception):
    """A problem the user can fix; its message names the problem and the fix."""


class PromptFileError(TokentrailError):
    pass


class ModelLoadError(TokentrailError):
    pass


class ArchitectureError(TokentrailError):
    pass


class StoreError(TokentrailError):
    pass

"""The one exception family the CLI turns into a one-line message and exit code 2."""


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

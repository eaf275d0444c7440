"""User-facing errors: each names the problem and the fix, and the CLI prints it without a traceback."""


class ES2Error(Exception):
    """An error the user can fix. `hint` says how."""

    exit_code = 2

    def __init__(self, problem: str, hint: str = ""):
        self.problem = problem
        self.hint = hint
        super().__init__(f"{problem}\n  fix: {hint}" if hint else problem)


class DataError(ES2Error):
    """Input data cannot be read or has the wrong shape."""


class ConfigError(ES2Error):
    """params.yaml or a command-line override is malformed."""


class ModelError(ES2Error):
    """A model path or id cannot be loaded as a causal LM."""


class ValidationFailed(ES2Error):
    """The data quality suite failed; the report says which expectations and rows."""

    exit_code = 1

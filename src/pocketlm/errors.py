"""Errors a user can act on. The CLI prints them as one line and exits with code 2."""


class PocketError(Exception):
    """A problem with the user's input, stated with the fix.

    Args:
        problem: what is wrong, naming the file or value.
        fix: what the user should do about it.
    """

    def __init__(self, problem: str, fix: str = ""):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem} — {fix}" if fix else problem)


class ModelNotFoundError(PocketError):
    """No model at the given path, name or hub id."""


class CorruptModelError(PocketError):
    """Weights or config that cannot be read."""


class UnsupportedModelError(PocketError):
    """An architecture pocketlm does not handle."""


class DataError(PocketError):
    """Evaluation text or task file that is missing, empty or too short."""


class ConfigError(PocketError):
    """An option or config value out of range."""


class OutputExistsError(PocketError):
    """The output path exists and overwriting was not asked for, or it would overwrite an input."""


class IntegrityError(PocketError):
    """A package or installed model that fails its signature, hash, version or base check."""

"""The few exception types a user of megafold catches. Each message names the input."""


class MegafoldError(Exception):
    """Base class of megafold's user-facing errors."""


class StructureError(MegafoldError, ValueError):
    """A structure file is missing, malformed or unusable (the message names the file)."""


class CacheError(MegafoldError, RuntimeError):
    """A precache store or checkpoint is missing, corrupt or of the wrong schema."""


class ConfigError(MegafoldError, ValueError):
    """A configuration value or command-line option is invalid."""

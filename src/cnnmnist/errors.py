"""The project's own exceptions; only cli.py turns them into exit codes."""


class CnnmnistError(Exception):
    """A failure the user can act on; the message says what and where (exit 1)."""


class UsageError(CnnmnistError):
    """The user asked for something that does not exist (exit 2)."""


class DataError(CnnmnistError):
    """A dataset file is missing, malformed or does not match its checksum."""


class CheckpointError(CnnmnistError):
    """A checkpoint directory is missing, incomplete, corrupted or of an unknown format."""


class Interrupted(CnnmnistError):
    """The user stopped a run (Ctrl-C); the message says how to resume (exit 130)."""

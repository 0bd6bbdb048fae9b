"""User-facing errors: the CLI prints their message (what is wrong and how to fix it), no traceback."""


class H3FusionError(Exception):
    """A mistake in input, config or environment that the user can fix."""


class DataError(H3FusionError):
    """A missing, malformed or unreachable data source."""


class ModelError(H3FusionError):
    """A model or adapter that cannot be loaded or combined."""


class ArtifactError(H3FusionError):
    """A required artifact of an earlier stage is missing or incomplete."""


class AblationError(H3FusionError):
    """An ablation that cannot run as configured."""

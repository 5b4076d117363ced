"""The service's refusals, by HTTP status (api.py maps them); their own file so that every part of the
service can raise them without importing core.py (which imports those parts)."""

from ..errors import MedCLIPSAMError


class NotFound(MedCLIPSAMError):
    """An unknown volume or job id (HTTP 404)."""


class Conflict(MedCLIPSAMError):
    """A request that does not fit the job's state, e.g. the result of a running job (HTTP 409)."""

"""What every request field must be, for every kind of job the service offers: finite numbers within
bounds, text of bounded length; and refusals in the API's words (one sentence that names request fields,
never a command-line flag an HTTP client cannot give).

The request models (api.py) build their fields from these types; a job's own deeper checks (preset
overrides, windows, prompts) run at submission through the same code the command line uses
(SegmentRequest.validate), and their sentences pass through api_words."""

import re
from typing import Annotated, Optional

from pydantic import ConfigDict, Field

from ..errors import MedCLIPSAMError

# extra fields refused; NaN and +-Infinity (JSON's NaN, Infinity, 1e999) refused in every float field
STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)
Text = Annotated[str, Field(max_length=4000)]
Coordinate = Annotated[float, Field(ge=-1e7, le=1e7)]        # patient mm
Point = Annotated[list[Coordinate], Field(min_length=3, max_length=3)]


def number(low, high):
    """A finite float within [low, high]."""
    return Annotated[float, Field(ge=low, le=high, allow_inf_nan=False)]


def optional_number(low, high):
    return Optional[number(low, high)]


class Invalid(MedCLIPSAMError):
    """A request whose content cannot be done as asked (HTTP 422)."""


# command-line words in sentences shared with the CLI -> the request's words
_PHRASES = (("once per --prompt", "once per prompt"), ("--absent-if was given", "'absent_if' was given"),
            ("e.g. --prompt 'brain tumor'", "e.g. 'brain tumor'"), ("--set ", "'overrides' "))


def api_words(text):
    """A sentence for an HTTP client: command-line flags become the request's field names."""
    for old, new in _PHRASES:
        text = text.replace(old, new)
    return re.sub(r"(?<![\w-])--([a-z][a-z0-9-]*)", lambda m: "'" + m.group(1).replace("-", "_") + "'", text)


def body_sentence(errors):
    """The first validation error of a request as one sentence."""
    if not errors:
        return "the request is malformed"
    e = errors[0]
    loc = [p for p in e.get("loc", ()) if p != "body"]
    if e.get("type") == "json_invalid":
        return "the request body is not valid JSON"
    if not loc and e.get("type") in ("model_attributes_type", "dict_type", "model_type"):
        return "the request body must be a JSON object"
    where = ".".join(str(p) for p in loc)
    msg = str(e.get("msg", "is invalid")).rstrip(".")
    msg = msg[0].lower() + msg[1:] if msg else "is invalid"
    return f"'{where}': {msg}" if where else f"the request body: {msg}"

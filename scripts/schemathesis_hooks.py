"""Schemathesis hooks for scripts/fuzz (docs/RELIABILITY.md, "Fuzzing").

Loaded with SCHEMATHESIS_HOOKS=scripts/schemathesis_hooks.py.
"""

import uuid

import schemathesis


def _is_uuid(value):
    try:
        return len(value) == 36 and str(uuid.UUID(value)) == value.lower()
    except (TypeError, ValueError, AttributeError):
        return False


@schemathesis.hook
def before_call(ctx, case, kwargs):
    """Every request gets an `x-request-id` of its own.

    The server remembers each request id with the request it came with and answers a different
    request under a used id with 422 RequestIdReused (docs/API.md). Schemathesis reuses generated
    values across cases, so a schema-valid id (a UUID) is replaced by a fresh uuid4 just before
    the request is sent, which keeps the request schema-valid. An id that is not a UUID (a
    negative test case) is sent as generated.
    """
    headers = case.headers or {}
    for name, value in list(headers.items()):
        if name.lower() == "x-request-id" and _is_uuid(value):
            headers[name] = str(uuid.uuid4())


def _rejected_fields(response):
    try:
        reasons = response.json()["details"]["validationErrorReasons"]
        return {reason["fieldName"] for reason in reasons}
    except (ValueError, KeyError, TypeError):
        return None


@schemathesis.hook
def filter_failure(ctx, failure, case, response):
    """Accepts two failures that are not the API's fault, both rules JSON Schema cannot state.

    - A made-up list cursor. A cursor is opaque (openapi.json: unpadded base64url, 51 to 76
      characters); only the ones the service gave out as `nextCursor` decode, and the server
      answers any other with 400 Validation naming `cursor` alone. Schemathesis cannot know the
      cursors the service gave out.
    - A recovery window that runs backwards or spans more than 14 days. `since` and `until` are
      each a date-time (openapi.json), but how they relate (`until` after `since`, at most 14
      days later, `until` defaulting to now) is a rule across two fields; the server answers
      400 Validation naming `until` alone.

    So a "schema-valid request rejected" (ST202, check positive_data_acceptance) is dropped in
    exactly those two cases. Every other failure, and this check for every other field, stays.
    """
    if failure.code != "ST202" or response.status_code != 400:
        return True
    rejected = _rejected_fields(response)
    if (case.query or {}).get("cursor") and rejected == {"cursor"}:
        return False
    if case.method.upper() == "POST" and case.path.endswith("/recover") and rejected == {"until"}:
        return False
    return True

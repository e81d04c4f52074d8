"""The query-expansion fields of POST /v1/search (`serving.http_requests`): JSON
`"expand": {"n": 5, "alpha": 3}` (null or absent: off), or the form fields `expand_n` and
`expand_alpha` of a multipart image upload.  Either becomes a `retrieval.rerank.QueryExpansion`;
a bad value is a QueryError with code bad_expand whose message lists the allowed values.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from retrieval.errors import QueryError
from retrieval.rerank import MAX_EXPANSION_N, QueryExpansion
from serving.errors import shorten

FORM_FIELDS = ("expand_n", "expand_alpha")
ALLOWED = f'{{"n": an integer from 1 to {MAX_EXPANSION_N}, "alpha": a finite number >= 0}}'
_INTEGER = re.compile(r"[0-9]{1,6}")


def expand_from_json(value: Any) -> QueryExpansion | None:
    """The JSON field "expand" (None when absent or null)."""
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != {"n", "alpha"}:
        raise _bad(f"got {shorten(value)}")
    n, alpha = value["n"], value["alpha"]
    if isinstance(n, bool) or not isinstance(n, int):
        raise _bad(f'"n" is {shorten(n)}')
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise _bad(f'"alpha" is {shorten(alpha)}')
    return _expansion(n, alpha)


def expand_from_form(form: Mapping[str, Any]) -> QueryExpansion | None:
    """The form fields expand_n and expand_alpha (None when neither is there)."""
    given = [name for name in FORM_FIELDS if name in form]
    if not given:
        return None
    if len(given) == 1:
        raise _bad(f"give both form fields, or neither; got {given[0]} only", form=True)
    n, alpha = form["expand_n"], form["expand_alpha"]
    if not isinstance(n, str) or not _INTEGER.fullmatch(n.strip()):
        raise _bad(f"expand_n is {shorten(n)}", form=True)
    try:
        number = float(alpha) if isinstance(alpha, str) else math.nan
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise _bad(f"expand_alpha is {shorten(alpha)}", form=True)
    return _expansion(int(n), number, form=True)


def _expansion(n: int, alpha: float, form: bool = False) -> QueryExpansion:
    try:
        return QueryExpansion(n, alpha)
    except QueryError as exc:
        raise _bad(str(exc), form) from None


def _bad(detail: str, form: bool = False) -> QueryError:
    """bad_expand, the message starting with the allowed values."""
    if form:
        allowed = (
            f'form fields "expand_n" (an integer from 1 to {MAX_EXPANSION_N}) and "expand_alpha" '
            "(a finite number >= 0) go together"
        )
    else:
        allowed = f'"expand" must be {ALLOWED}'
    return QueryError(f"{allowed}; {detail}", code="bad_expand")

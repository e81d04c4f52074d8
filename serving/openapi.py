"""The OpenAPI 3.1 description of the HTTP API (`serving.http`), served at /v1/openapi.json.

Hand-written to match what the app answers: request fields and their checks
(`serving.http_requests`), response shapes, and every error code with its status
(`ERROR_CODES`).  tests/test_http_openapi.py runs schemathesis against the real server with
it, and checks that each code the app can answer is listed here.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

from retrieval.rerank import MAX_EXPANSION_N
from retrieval.version import __version__
from serving.http_requests import MAX_K
from serving.limits import DEFAULT_MAX_BODY_BYTES

# Every error code the API answers, by HTTP status.
ERROR_CODES: dict[int, tuple[str, ...]] = {
    400: (
        "bad_request",
        "bad_json",
        "unknown_field",
        "query_kind",
        "bad_k",
        "bad_vector",
        "dimension_mismatch",
        "non_finite",
        "zero_vector",
        "bad_expand",
        "expand_unsupported",
        "bad_base64",
        "bad_id",
        "bad_embedder",
        "embedder_required",
        "unknown_embedder",
        "bad_multipart",
        "bad_query",
        "id_queries_unavailable",
        "image_queries_unavailable",
        "client_disconnected",
    ),
    404: ("unknown_id", "not_found"),
    405: ("method_not_allowed",),
    408: ("body_timeout",),
    413: ("body_too_large",),
    415: ("unsupported_media_type",),
    422: ("undecodable_image",),
    500: ("internal",),
    503: ("embedder_unavailable", "overloaded"),
}

_DESCRIPTIONS = {
    400: "The request is not a valid query; `error.code` says what is wrong.",
    404: "unknown_id: the id is not in the index (unknown paths: not_found).",
    405: "The path exists with another method (the Allow header lists it).",
    408: "body_timeout: the request body did not arrive within the server's body_timeout.",
    413: "body_too_large: the body is larger than the server's max_body_bytes.",
    415: "unsupported_media_type: send application/json or multipart/form-data.",
    422: "undecodable_image: the image cannot be decoded, or is above the pixel limit.",
    500: "internal: a defect of the server (logged with its traceback).",
    503: "embedder_unavailable: the image model cannot be loaded; overloaded: a limit of the "
    "server was reached, retry after Retry-After seconds.",
}


def _error_schema(codes: tuple[str, ...]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["error"],
        "additionalProperties": False,
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "additionalProperties": False,
                "properties": {
                    "code": {"type": "string", "enum": list(codes)},
                    "message": {"type": "string", "maxLength": 2003},
                },
            }
        },
    }


def _errors(*statuses: int) -> dict[str, Any]:
    return {
        str(status): {
            "description": _DESCRIPTIONS[status],
            "content": {"application/json": {"schema": _error_schema(ERROR_CODES[status])}},
        }
        for status in statuses
    }


_K = {
    "type": "integer",
    "minimum": 1,
    "maximum": MAX_K,
    "default": 10,
    "description": "hits to return, at most the embedder's max_k (GET /v1/index)",
}
_EMBEDDER = {
    "type": "string",
    "description": "which index answers; required when the run serves several embedders",
}

_EXPAND = {
    "type": ["object", "null"],
    "description": "alpha query expansion (cosine and dot_product indexes; squared_l2: 400 "
    "expand_unsupported): the query's top n hits, weighted by max(cosine, 0) ** alpha and the "
    "query by 1, make a new query that is searched for the k hits. null or absent: off",
    "required": ["n", "alpha"],
    "additionalProperties": False,
    "properties": {
        "n": {"type": "integer", "minimum": 1, "maximum": MAX_EXPANSION_N},
        "alpha": {"type": "number", "minimum": 0},
    },
}

_QUERY = {
    "type": "object",
    "description": "Exactly one of vector, image, id; plus k, embedder, expand, and exclude_self for id queries.",
    "additionalProperties": False,
    "properties": {
        "vector": {
            "type": "array",
            "items": {"type": "number"},
            "minItems": 1,
            "description": "a query vector of the embedder's dimension (need not be normalised)",
        },
        "image": {
            "type": "string",
            "contentEncoding": "base64",
            "description": "an encoded image (JPEG, PNG, ...), base64, or a data: URL",
        },
        "id": {"type": "string", "minLength": 1, "description": "an indexed id: its own vector is the query"},
        "k": _K,
        "embedder": _EMBEDDER,
        "exclude_self": {
            "type": "boolean",
            "default": False,
            "description": "id queries only: leave the queried id out of the hits (and of the expansion)",
        },
        "expand": _EXPAND,
    },
    "oneOf": [
        {"required": ["vector"], "not": {"anyOf": [{"required": ["image"]}, {"required": ["id"]}]}},
        {"required": ["image"], "not": {"anyOf": [{"required": ["vector"]}, {"required": ["id"]}]}},
        {"required": ["id"], "not": {"anyOf": [{"required": ["vector"]}, {"required": ["image"]}]}},
    ],
}

_UPLOAD = {
    "type": "object",
    "required": ["image"],
    "additionalProperties": False,
    "properties": {
        "image": {
            "type": "string",
            "contentMediaType": "application/octet-stream",
            "description": "the image file",
        },
        "k": {
            "type": "string",
            "pattern": "^[0-9]{1,4}$",
            "description": f"hits to return, 1 to the embedder's max_k (at most {MAX_K})",
        },
        "embedder": _EMBEDDER,
        "expand_n": {
            "type": "string",
            "pattern": "^[0-9]{1,3}$",
            "description": f"query expansion: hits that expand the query, 1 to {MAX_EXPANSION_N} "
            "(with expand_alpha)",
        },
        "expand_alpha": {
            "type": "string",
            "description": "query expansion: the weights' exponent, a finite number >= 0 (with expand_n)",
        },
    },
    "dependentRequired": {"expand_n": ["expand_alpha"], "expand_alpha": ["expand_n"]},
}

_HIT = {
    "type": "object",
    "required": ["rank", "id", "score", "metadata"],
    "additionalProperties": False,
    "properties": {
        "rank": {"type": "integer", "minimum": 1},
        "id": {"type": "string"},
        "score": {
            "type": "number",
            "description": "cosine: similarity in [-1, 1]; dot_product: similarity; squared_l2: squared distance",
        },
        "metadata": {
            "type": "object",
            "description": "the item's metadata row: sha256, width, height, passthrough columns; "
            "source only when the server runs with --expose_source",
        },
    },
}

_RESULT = {
    "type": "object",
    "required": ["embedder", "run_id", "k", "distance", "higher_is_better", "hits", "took_ms"],
    "additionalProperties": False,
    "properties": {
        "embedder": {"type": "string"},
        "run_id": {"type": "string"},
        "k": {"type": "integer", "minimum": 1, "maximum": MAX_K},
        "distance": {"type": "string", "enum": ["cosine", "dot_product", "squared_l2"]},
        "higher_is_better": {"type": "boolean"},
        "hits": {"type": "array", "items": _HIT, "maxItems": MAX_K},
        "took_ms": {"type": "number", "minimum": 0},
    },
}

_NULLABLE_STRING = {"type": ["string", "null"]}

_EMBEDDER_INFO = {
    "type": "object",
    "required": ["n", "d", "distance", "higher_is_better", "method", "index_dir"],
    "properties": {
        "n": {"type": "integer", "minimum": 0},
        "d": {"type": "integer", "minimum": 1},
        "index_d": {"type": "integer", "minimum": 1},
        "pca": {"type": "boolean"},
        "dba": {
            "type": ["object", "null"],
            "description": "database-side augmentation the index was built with: n, alpha, "
            "neighbours (exact or index), seconds; null: none",
        },
        "query_expansion": {"type": "boolean", "description": "whether queries may set expand"},
        "distance": {"type": "string", "enum": ["cosine", "dot_product", "squared_l2"]},
        "higher_is_better": {"type": "boolean"},
        "method": {"type": "string"},
        "recall": {
            "type": "object",
            "description": "recall against exact search measured at build time: k, value, ..., "
            "and per_k, [{k, value, n_queries}] at every k the build measured",
        },
        "search_defaults": {"type": "object"},
        "max_k": {
            "type": "integer",
            "minimum": 1,
            "maximum": MAX_K,
            "description": "the most hits a query may ask",
        },
        "fingerprint": _NULLABLE_STRING,
        "handle": {"description": "a builtin or remote handle, or the last part of a local path"},
        "input_size": {"type": ["integer", "null"]},
        "metadata_columns": {"type": "array", "items": {"type": "string"}},
        "id_queries": {"type": "boolean"},
        "image_queries": {"type": "boolean"},
        "model_loaded": {"type": "boolean"},
        "index_dir": {"type": "string", "description": "relative to the served root"},
    },
}

_INDEX_INFO = {
    "type": "object",
    "required": ["run_id", "run_dir", "status", "embedders", "refresh"],
    "properties": {
        "run_id": {"type": "string"},
        "run_dir": {"type": "string", "description": "relative to the served root (runs/<run_id>, or .)"},
        "root": {"type": ["string", "null"], "description": '"." when an output root is served, else null'},
        "status": {"type": "string"},
        "created_at": _NULLABLE_STRING,
        "loaded_at": {"type": "string"},
        "load_seconds": {"type": "number"},
        "embedders": {"type": "object", "additionalProperties": _EMBEDDER_INFO},
        "refresh": {
            "type": "object",
            "required": ["follows_latest"],
            "properties": {
                "follows_latest": {"type": "boolean"},
                "last_checked_at": _NULLABLE_STRING,
                "last_error": _NULLABLE_STRING,
                "failed_run": _NULLABLE_STRING,
                "retry_at": _NULLABLE_STRING,
            },
        },
    },
}


@functools.cache
def _document() -> dict[str, Any]:
    json_response = lambda schema, description: {  # noqa: E731
        "description": description,
        "content": {"application/json": {"schema": schema}},
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "imgindex search",
            "version": __version__,
            "description": "Nearest neighbours of a vector, an image or an indexed id in the "
            "published run of an imgindex output root. Errors are "
            '{"error": {"code", "message"}}; messages echo client input shortened to 200 '
            f"characters. Bodies up to {DEFAULT_MAX_BODY_BYTES} bytes by default.",
        },
        "paths": {
            "/v1/search": {
                "post": {
                    "operationId": "search",
                    "summary": "Nearest neighbours of a vector, an image or an id",
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {"schema": _QUERY, "examples": {}},
                            "multipart/form-data": {"schema": _UPLOAD},
                        },
                    },
                    "responses": {
                        "200": json_response(_RESULT, "The hits, best first."),
                        **_errors(400, 404, 408, 413, 415, 422, 500, 503),
                    },
                }
            },
            "/v1/healthz": {
                "get": {
                    "operationId": "healthz",
                    "summary": "Liveness and the run being served",
                    "responses": {
                        "200": json_response(
                            {
                                "type": "object",
                                "required": ["status", "run_id"],
                                "additionalProperties": False,
                                "properties": {"status": {"const": "ok"}, "run_id": {"type": "string"}},
                            },
                            "The server is up.",
                        ),
                        **_errors(500),
                    },
                }
            },
            "/v1/index": {
                "get": {
                    "operationId": "index",
                    "summary": "What is served: run, embedders, refresh status (paths relative to the root)",
                    "responses": {"200": json_response(_INDEX_INFO, "What is loaded."), **_errors(500)},
                }
            },
            "/v1/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "summary": "This description",
                    "responses": {"200": json_response({"type": "object"}, "OpenAPI 3.1"), **_errors(500)},
                }
            },
        },
    }


def openapi_document(examples: dict[str, Any] | None = None) -> dict[str, Any]:
    """The OpenAPI description (a fresh copy), with `examples` ({name: request body}, see
    `query_examples`) as the search request's examples."""
    document = copy.deepcopy(_document())
    content = document["paths"]["/v1/search"]["post"]["requestBody"]["content"]["application/json"]
    content["examples"] = {name: {"value": value} for name, value in (examples or {}).items()}
    return document


def query_examples(info: dict[str, Any], first_ids: dict[str, str | None]) -> dict[str, Any]:
    """Example requests that the served run answers: per embedder a vector query (a vector of
    its dimension) and an id query (its first id).  info: `Searcher.info()`; first_ids:
    {embedder: an indexed id or None}."""
    examples: dict[str, Any] = {}
    for name, emb in sorted(info["embedders"].items()):
        d = emb["d"]
        examples[f"vector-{name}"] = {
            "vector": [round(((i * 7919) % 13 - 6) / 6, 3) or 0.5 for i in range(d)],
            "k": 5,
            "embedder": name,
        }
        if emb.get("id_queries") and first_ids.get(name) is not None:
            examples[f"id-{name}"] = {"id": first_ids[name], "k": 3, "embedder": name, "exclude_self": True}
    return examples

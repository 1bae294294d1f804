"""Domain errors -> HTTP status and a JSON body {"error": {"code", "message"}}, registered by exception type."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from http import HTTPStatus

from aws_lambda_powertools.event_handler import Response, content_types
from aws_lambda_powertools.event_handler.api_gateway import ApiGatewayResolver
from aws_lambda_powertools.event_handler.exceptions import NotFoundError
from aws_lambda_powertools.event_handler.openapi.exceptions import (
    RequestUnsupportedContentType,
    RequestValidationError,
)

from clipsearch.errors import (
    DatasetDeleting,
    DatasetNotFound,
    ImageTooLarge,
    InvalidImage,
    InvalidKey,
    InvalidRequest,
    KeyOutsideDataset,
    ModelMismatch,
    ObjectNotFound,
    TransientError,
    UnsupportedMediaType,
)
from clipsearch.http.models import NAMED_PARAMETERS
from clipsearch.search_results import InvalidParameter

logger = logging.getLogger(__name__)

# Powertools picks the handler of the most specific class in the exception's MRO.
_STATUS: dict[type[Exception], tuple[HTTPStatus, str]] = {
    InvalidRequest: (HTTPStatus.BAD_REQUEST, "invalid_request"),
    InvalidKey: (HTTPStatus.BAD_REQUEST, "invalid_key"),
    KeyOutsideDataset: (HTTPStatus.BAD_REQUEST, "key_outside_dataset"),
    UnsupportedMediaType: (HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type"),
    InvalidImage: (HTTPStatus.BAD_REQUEST, "invalid_image"),
    ImageTooLarge: (HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "image_too_large"),
    DatasetNotFound: (HTTPStatus.NOT_FOUND, "dataset_not_found"),
    DatasetDeleting: (HTTPStatus.CONFLICT, "dataset_deleting"),
    ObjectNotFound: (HTTPStatus.NOT_FOUND, "object_not_found"),
    ModelMismatch: (HTTPStatus.CONFLICT, "model_mismatch"),
}
UNAVAILABLE_MESSAGE = "a service behind this API is unavailable; retry shortly"


def error_response(status: HTTPStatus, code: str, message: str) -> Response:
    return Response(
        status_code=status.value,
        content_type=content_types.APPLICATION_JSON,
        body=json.dumps({"error": {"code": code, "message": message}}),
    )


def register_error_handlers(app: ApiGatewayResolver) -> None:
    for error_class, (status, code) in _STATUS.items():
        app.exception_handler(error_class)(_domain_handler(status, code))

    @app.exception_handler(TransientError)
    def unavailable(error: TransientError) -> Response:
        # The details name hosts, ports and keys: they go to the log (with the request id), not to the caller.
        logger.warning("503 unavailable: %s", error)
        return error_response(HTTPStatus.SERVICE_UNAVAILABLE, "unavailable", UNAVAILABLE_MESSAGE)

    @app.exception_handler(InvalidParameter)
    def invalid_parameter(error: InvalidParameter) -> Response:
        logger.info("400 invalid_%s: %s", error.parameter, error)
        return error_response(HTTPStatus.BAD_REQUEST, f"invalid_{error.parameter}", str(error))

    @app.exception_handler(RequestValidationError)
    def invalid_request(error: RequestValidationError) -> Response:
        errors = error.errors()
        return error_response(HTTPStatus.BAD_REQUEST, validation_code(errors), _describe(errors))

    @app.exception_handler(RequestUnsupportedContentType)
    def unsupported_content_type(error: RequestUnsupportedContentType) -> Response:
        return error_response(
            HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type", "send the request as application/json"
        )

    @app.exception_handler(UnicodeDecodeError)
    def undecodable_body(error: UnicodeDecodeError) -> Response:
        return error_response(HTTPStatus.BAD_REQUEST, "invalid_request", "the request body is not UTF-8 text")

    @app.not_found
    def unknown_route(error: NotFoundError) -> Response:
        event = app.current_event
        return error_response(
            HTTPStatus.NOT_FOUND, "route_not_found", f"no route {event.http_method} {event.path}"
        )

    @app.exception_handler(Exception)
    def unexpected(error: Exception) -> Response:
        logger.exception("unhandled error")
        return error_response(HTTPStatus.INTERNAL_SERVER_ERROR, "internal_error", "internal error")


def _domain_handler(status: HTTPStatus, code: str) -> Callable[[Exception], Response]:
    def handle(error: Exception) -> Response:
        logger.info("%s %s: %s", status.value, code, error)
        return error_response(status, code, str(error))

    return handle


def validation_code(errors) -> str:
    """invalid_<parameter> when every error is about one named parameter ('body.offset', 'query.min_score',
    'body.terms.0.weight'), else invalid_request."""
    parameters = {str(error["loc"][1]) if len(error.get("loc", ())) > 1 else None for error in errors}
    if len(parameters) == 1 and (parameter := parameters.pop()) in NAMED_PARAMETERS:
        return f"invalid_{parameter}"
    return "invalid_request"


def _describe(errors) -> str:
    """Pydantic's messages with where they apply ('body.k: ...'); never the input itself."""
    parts = []
    for error in errors:
        location = ".".join(str(part) for part in error.get("loc", ()))
        message = error.get("msg") or error.get("type", "invalid")
        if error.get("type") == "json_invalid":
            message = "the body is not valid JSON"
        parts.append(f"{location}: {message}" if location else message)
    return "; ".join(parts) or "invalid request"

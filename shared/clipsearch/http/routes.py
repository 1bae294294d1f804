"""Route definitions of the search and dataset functions, and the OpenAPI document generated from them."""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections.abc import Callable
from datetime import datetime
from http import HTTPStatus
from typing import TYPE_CHECKING, Annotated, Protocol

from aws_lambda_powertools.event_handler import (
    APIGatewayHttpResolver,
    Response,
    content_types,
)
from aws_lambda_powertools.event_handler.openapi.params import Query
from pydantic import ValidationError

from clipsearch.dataset_service import DatasetService
from clipsearch.errors import InvalidRequest, UnsupportedMediaType
from clipsearch.http.errors import register_error_handlers
from clipsearch.http.models import (
    AUTOCUT_DESCRIPTION,
    MIN_SCORE_DESCRIPTION,
    OFFSET_DESCRIPTION,
    PREFIX_DESCRIPTION,
    SINCE_DESCRIPTION,
    UNTIL_DESCRIPTION,
    DatasetDeletionAccepted,
    DatasetDetail,
    DatasetList,
    DatasetOut,
    DeletionOut,
    DuplicateGroupOut,
    DuplicateOut,
    DuplicatesResponse,
    ErrorResponse,
    FailureOut,
    ImageSearchRequest,
    IsoDateTime,
    QueryTermIn,
    SearchHitOut,
    SearchResponse,
    TextSearchRequest,
)
from clipsearch.ports import DatasetSummary, DeletionProgress
from clipsearch.search_results import (
    DEFAULT_DUPLICATE_SCORE,
    DEFAULT_K,
    MAX_K,
    MAX_OFFSET,
    MAX_PREFIX_CHARS,
    MIN_DUPLICATE_SCORE,
    DuplicateReport,
    ImageFilter,
    InvalidParameter,
    QueryTerm,
    SearchOptions,
    SearchResult,
)

if TYPE_CHECKING:  # the datasets function must not import faiss and onnxruntime
    from clipsearch.search import SearchService

API_TITLE = "clipsearch"
API_VERSION = "1"

KParam = Annotated[
    int | None, Query(ge=1, le=MAX_K, description=f"How many results (default {DEFAULT_K}), in decimal digits.")
]
MAX_JSON_DEPTH_MESSAGE = "the JSON body is nested too deeply"
PresignParam = Annotated[bool, Query(description="Add a presigned GET URL to each result.")]
ThumbnailsParam = Annotated[bool, Query(description="Add a presigned URL of each result's thumbnail.")]
OffsetParam = Annotated[int, Query(ge=0, le=MAX_OFFSET, description=OFFSET_DESCRIPTION)]
MinScoreParam = Annotated[float | None, Query(ge=-1, le=1, description=MIN_SCORE_DESCRIPTION)]
AutocutParam = Annotated[bool, Query(description=AUTOCUT_DESCRIPTION)]
PrefixParam = Annotated[str | None, Query(max_length=MAX_PREFIX_CHARS, description=PREFIX_DESCRIPTION)]
SinceParam = Annotated[IsoDateTime | None, Query(description=SINCE_DESCRIPTION)]
UntilParam = Annotated[IsoDateTime | None, Query(description=UNTIL_DESCRIPTION)]
DuplicateScoreParam = Annotated[
    float,
    Query(ge=MIN_DUPLICATE_SCORE, le=1, description="The cosine at or above which two images are duplicates."),
]


def _responses(success: type, *errors: int) -> dict:
    """The documented responses: Powertools drops its default 200 once any response is given."""
    error = {"application/json": {"model": ErrorResponse}}
    documented = {200: {"description": "OK", "content": {"application/json": {"model": success}}}}
    documented.update({status: {"description": HTTPStatus(status).phrase, "content": error} for status in errors})
    return documented


class SearchObserver(Protocol):
    """Hears how each search went (the search function publishes it as metrics)."""

    def record_query(self, kind: str, took_ms: float) -> None: ...  # kind: "text" | "image"

    def record_cache_lookup(self, cache: str, hit: bool) -> None: ...  # see SearchService.listen_to_caches


_IMAGE_REQUEST_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "application/json": {"schema": ImageSearchRequest.model_json_schema()},
        },
    }
}


def search_api(search_service: Callable[[], SearchService], observer: SearchObserver) -> APIGatewayHttpResolver:
    app = _resolver()

    def observed_service() -> SearchService:
        service = search_service()
        service.listen_to_caches(observer.record_cache_lookup)
        return service

    def answer(result: SearchResult, kind: str, started: float) -> SearchResponse:
        response = _search_response(result, started)
        observer.record_query(kind, response.took_ms)
        return response

    @app.post(
        "/datasets/<dataset>/search/text",
        summary="Search a dataset's images by text",
        responses=_responses(SearchResponse, 400, 404, 409, 415, 500, 503),
        tags=["search"],
    )
    def search_text(
        dataset: str, request: TextSearchRequest, presign: PresignParam = False, thumbnails: ThumbnailsParam = False
    ) -> SearchResponse:
        started = time.perf_counter()
        options = _options(
            request.offset, request.min_score, request.autocut, request.prefix, request.since, request.until,
            thumbnails,
        )
        service = observed_service()
        if request.terms is not None:
            terms = [_query_term(position, term) for position, term in enumerate(request.terms)]
            result = service.search_terms(dataset, terms, request.k, presign, options)
        else:
            result = service.search_text(dataset, request.query or "", request.k, presign, options)
        return answer(result, "text", started)

    @app.post(
        "/datasets/<dataset>/search/image",
        summary="Search a dataset's images by an example image",
        description=(
            "The image as the raw body (Content-Type image/*), or JSON with image_base64 or the key of "
            "an image of this dataset in the bucket (under datasets/<dataset>/, with an image suffix, at most "
            "1024 bytes, no empty, '.' or '..' segments, no control characters or backslashes: else 400 "
            "invalid_key or key_outside_dataset; a missing key is 404, an image over the request byte limit 413)."
        ),
        responses=_responses(SearchResponse, 400, 404, 409, 413, 415, 500, 503),
        tags=["search"],
        openapi_extensions=_IMAGE_REQUEST_BODY,
    )
    def search_image(
        dataset: str,
        k: KParam = None,
        presign: PresignParam = False,
        thumbnails: ThumbnailsParam = False,
        offset: OffsetParam = 0,
        min_score: MinScoreParam = None,
        autocut: AutocutParam = False,
        prefix: PrefixParam = None,
        since: SinceParam = None,
        until: UntilParam = None,
    ) -> SearchResponse:
        started = time.perf_counter()
        _check_query_digits(app.current_event.query_string_parameters or {})
        options = _options(offset, min_score, autocut, prefix, since, until, thumbnails)
        service = observed_service()
        content_type = (app.current_event.headers.get("content-type") or "").split(";")[0].strip().lower()
        if content_type.startswith("image/"):
            image = _raw_body(app.current_event)
            result = service.search_image(dataset, image, "request body", k or DEFAULT_K, presign, options)
        elif content_type in ("application/json", ""):
            request = _image_request(app.current_event.decoded_body)
            k = request.k or k or DEFAULT_K
            if request.key is not None:
                result = service.search_stored_image(dataset, request.key, k, presign, options)
            else:
                image = _base64(request.image_base64 or "")
                result = service.search_image(dataset, image, "image_base64", k, presign, options)
        else:
            raise UnsupportedMediaType(
                f"content type {content_type!r}: send image/* or application/json"
            )
        return answer(result, "image", started)

    @app.get(
        "/datasets/<dataset>/duplicates",
        summary="Groups of near-duplicate images",
        description=(
            "A range search of every indexed image against the dataset's index: images scoring at least "
            "min_score with another image are grouped (transitively). Scans at most 20,000 images (else 400)."
        ),
        responses=_responses(DuplicatesResponse, 400, 404, 409, 500, 503),
        tags=["search"],
    )
    def duplicates(dataset: str, min_score: DuplicateScoreParam = DEFAULT_DUPLICATE_SCORE) -> DuplicatesResponse:
        started = time.perf_counter()
        report = observed_service().find_duplicates(dataset, min_score)
        return _duplicates_response(report, started)

    _openapi_route(app)
    return app


def datasets_api(dataset_service: Callable[[], DatasetService]) -> APIGatewayHttpResolver:
    app = _resolver()

    @app.get("/datasets", summary="List datasets", responses=_responses(DatasetList, 500, 503), tags=["datasets"])
    def list_datasets() -> DatasetList:
        return DatasetList(datasets=[_dataset_out(summary) for summary in dataset_service().list()])

    @app.get(
        "/datasets/<dataset>",
        summary="Describe a dataset, with its most recent failures",
        responses=_responses(DatasetDetail, 400, 404, 500, 503),
        tags=["datasets"],
    )
    def get_dataset(dataset: str) -> DatasetDetail:
        summary = dataset_service().describe(dataset)
        return DatasetDetail(
            **_dataset_out(summary).model_dump(),
            recent_failures=[
                FailureOut(key=failure.key, reason=failure.reason, failed_at=failure.failed_at)
                for failure in summary.recent_failures
            ],
        )

    accepted = _responses(DatasetDeletionAccepted, 400, 404, 500, 503)
    accepted[202] = {**accepted.pop(200), "description": "Accepted: the deletion runs; poll the Location"}

    @app.delete(
        "/datasets/<dataset>",
        summary="Delete a dataset: its images, thumbnails, segments and catalog rows, in the background",
        description=(
            "Answers 202 at once (again while the deletion runs). From then on the dataset's searches answer "
            "409 dataset_deleting and its new uploads wait; GET the Location to follow the progress until it "
            "answers 404."
        ),
        responses=accepted,
        tags=["datasets"],
    )
    def delete_dataset(dataset: str) -> Response[DatasetDeletionAccepted]:
        progress = dataset_service().delete(dataset)
        location = f"/datasets/{dataset}"
        body = DatasetDeletionAccepted(
            dataset=dataset, status="deleting", location=location, deletion=_deletion_out(progress)
        )
        return Response(
            status_code=HTTPStatus.ACCEPTED.value,
            content_type=content_types.APPLICATION_JSON,
            body=body,
            headers={"Location": location},
        )

    _openapi_route(app)
    return app


def _resolver() -> APIGatewayHttpResolver:
    app = APIGatewayHttpResolver(enable_validation=True, json_body_deserializer=_json_body)
    register_error_handlers(app)
    return app


def _openapi_route(app: APIGatewayHttpResolver) -> None:
    document: list[str] = []

    @app.get("/openapi.json", include_in_schema=False)
    def openapi():
        if not document:  # generated on first request: nothing at import time
            document.append(_without_422(app.get_openapi_json_schema(title=API_TITLE, version=API_VERSION)))
        return Response(status_code=200, content_type=content_types.APPLICATION_JSON, body=document[0])


def _without_422(document: str) -> str:
    """Powertools documents 422 for validation errors; this API answers them with 400 (see http.errors)."""
    parsed = json.loads(document)
    for operations in parsed.get("paths", {}).values():
        for operation in operations.values():
            operation.get("responses", {}).pop("422", None)
    return json.dumps(parsed)


def _search_response(result: SearchResult, started: float) -> SearchResponse:
    return SearchResponse(
        dataset=result.dataset,
        model=result.model_id,
        k=result.k,
        offset=result.offset,
        results=[
            SearchHitOut(
                rank=hit.rank, score=hit.score, path=hit.path, key=hit.key, url=hit.url, thumbnail=hit.thumbnail
            )
            for hit in result.hits
        ],
        took_ms=round((time.perf_counter() - started) * 1000, 3),
        truncated=result.truncated,
        autocut_at=result.autocut_at,
    )


def _duplicates_response(report: DuplicateReport, started: float) -> DuplicatesResponse:
    return DuplicatesResponse(
        dataset=report.dataset,
        model=report.model_id,
        min_score=report.min_score,
        groups=[
            DuplicateGroupOut(images=[DuplicateOut(path=hit.path, key=hit.key, score=hit.score) for hit in group.hits])
            for group in report.groups
        ],
        took_ms=round((time.perf_counter() - started) * 1000, 3),
    )


def _options(
    offset: int, min_score: float | None, autocut: bool, prefix: str | None,
    since: datetime | None, until: datetime | None, thumbnails: bool,
) -> SearchOptions:
    return SearchOptions(offset, min_score, autocut, ImageFilter(prefix or None, since, until), thumbnails)


def _query_term(position: int, term: QueryTermIn) -> QueryTerm:
    image = None
    if term.image_base64 is not None:
        try:
            image = _base64(term.image_base64)
        except InvalidRequest:
            raise InvalidParameter("terms", f"term {position}: the image is not valid base64") from None
    return QueryTerm(weight=term.weight, text=term.text, image=image, key=term.key)


def _dataset_out(summary: DatasetSummary) -> DatasetOut:
    dataset = summary.dataset
    return DatasetOut(
        name=dataset.name,
        model=dataset.model_id,
        index_version=dataset.index_version,
        status="deleting" if summary.deletion else "active",
        counts=dict(summary.counts),
        created_at=dataset.created_at,
        updated_at=dataset.updated_at,
        deletion=_deletion_out(summary.deletion) if summary.deletion else None,
    )


def _deletion_out(progress: DeletionProgress) -> DeletionOut:
    return DeletionOut(
        requested_at=progress.requested_at,
        objects_deleted=progress.objects_deleted,
        rows_deleted=progress.rows_deleted,
        progress_at=progress.progress_at,
    )


def _json_body(body: str):
    """json.loads, with a body nested past the interpreter's recursion limit refused as the caller's mistake."""
    try:
        return json.loads(body)
    except RecursionError:
        raise InvalidRequest(MAX_JSON_DEPTH_MESSAGE) from None


def _check_query_digits(query: dict[str, str]) -> None:
    """Query-string integers as Python's int() would read them also allow '+5', ' 5', '5_0', '5.0': only digits pass."""
    k = query.get("k")
    if k is not None and not (k.isascii() and k.isdigit()):
        raise InvalidRequest("query.k: must be an integer written in decimal digits")
    offset = query.get("offset")
    if offset is not None and not (offset.isascii() and offset.isdigit()):
        raise InvalidParameter("offset", "must be an integer written in decimal digits")


def _raw_body(event) -> bytes:
    body = event.body or ""
    if event.is_base64_encoded:
        return _base64(body)
    return body.encode("utf-8", errors="surrogateescape")


def _image_request(body: str | None) -> ImageSearchRequest:
    if not body:
        raise InvalidRequest("send the image as the body (image/*) or JSON with image_base64 or key")
    try:
        return ImageSearchRequest.model_validate_json(body)
    except ValidationError as error:
        raise InvalidRequest(_validation_message(error)) from None


def _validation_message(error: ValidationError) -> str:
    parts = []
    for detail in error.errors(include_input=False, include_url=False):
        location = ".".join(str(part) for part in detail["loc"])
        parts.append(f"body.{location}: {detail['msg']}" if location else f"body: {detail['msg']}")
    return "; ".join(parts)


def _base64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest("the image is not valid base64") from None

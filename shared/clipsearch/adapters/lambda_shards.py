"""The ShardSearcher port over Lambda: a synchronous invoke of the shard search function per shard."""

from __future__ import annotations

import json
from collections.abc import Callable

from botocore.exceptions import BotoCoreError, ClientError

from clipsearch.errors import TransientError
from clipsearch.lazy import Lazy
from clipsearch.ports import ShardQuery
from clipsearch.shards import Ranking, query_payload, ranking_from_payload


class LambdaShardSearcher:
    """Invokes `function_name` (RequestResponse) with the query as JSON, the vector as base64 float32.

    Every failure (the call refused or throttled after retries, the function's own error, a timeout, an
    answer that is not a ranking) is a TransientError: the search answers 503 and the caller may retry.
    """

    def __init__(self, client, function_name: str, build_client: Callable[[], object] | None = None) -> None:
        self._client = Lazy(build_client or (lambda: client))
        self.function_name = function_name

    @classmethod
    def connecting_on_first_use(cls, build_client: Callable[[], object], function_name: str) -> LambdaShardSearcher:
        """A searcher whose Lambda client is built by the first fan-out: most searches never fan out, and
        building it (botocore loads the Lambda service model) costs a cold start ~0.1 s of CPU (12 runs)."""
        return cls(None, function_name, build_client)

    def search_shard(self, query: ShardQuery) -> Ranking:
        client = self._client.get()  # a client that cannot be built is a misconfiguration, not a transient fault
        try:
            response = client.invoke(
                FunctionName=self.function_name,
                InvocationType="RequestResponse",
                Payload=json.dumps(query_payload(query)).encode("utf-8"),
            )
            body = response["Payload"].read()
        except (ClientError, BotoCoreError) as error:
            raise TransientError(f"shard {query.shard} of {query.dataset!r}: invoking {self.function_name} failed: "
                                 f"{error}") from error
        try:
            answer = json.loads(body)
            if response.get("FunctionError"):
                raise TransientError(
                    f"shard {query.shard} of {query.dataset!r}: {self.function_name} failed "
                    f"({response['FunctionError']}): {answer.get('errorType')}: {answer.get('errorMessage')}"
                )
            return ranking_from_payload(answer)
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise TransientError(f"shard {query.shard} of {query.dataset!r}: {self.function_name} answered "
                                 f"{body[:200]!r}") from error

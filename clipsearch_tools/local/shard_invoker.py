"""The ShardSearcher port on the local stack: the shard search function run by the local function runner."""

from __future__ import annotations

from clipsearch.errors import TransientError
from clipsearch.ports import ShardQuery
from clipsearch.shards import Ranking, query_payload, ranking_from_payload
from clipsearch_tools.local.functions import FunctionError, FunctionHost
from clipsearch_tools.local.template import Function


class FunctionHostShardSearcher:
    """Invokes the template's shard search function on a FunctionHost with the payload Lambda would carry.

    Each shard number is its own slot of instances, so a shard's queries find its segments loaded; a failed
    invocation (the handler's error, a timeout, out of memory) is a TransientError, as with Lambda.
    """

    def __init__(self, host: FunctionHost, function: Function) -> None:
        self._host = host
        self.function = function

    def search_shard(self, query: ShardQuery) -> Ranking:
        try:
            answer = self._host.invoke(self.function, query_payload(query), slot=f"shard-{query.shard}")
        except FunctionError as error:
            raise TransientError(f"shard {query.shard} of {query.dataset!r}: {error}") from error
        try:
            return ranking_from_payload(answer)
        except (KeyError, TypeError, ValueError) as error:
            raise TransientError(f"shard {query.shard} of {query.dataset!r}: answered {str(answer)[:200]}") from error

"""SqsQueue: the ingestion queue over boto3, with SQS errors translated into domain errors."""

from __future__ import annotations

from collections.abc import Sequence

from botocore.exceptions import BotoCoreError, ClientError

from clipsearch.errors import TransientError

_SEND_BATCH = 10  # SQS's SendMessageBatch limit


class SqsQueue:
    def __init__(self, client, queue_url: str) -> None:
        self._client = client
        self.queue_url = queue_url

    def send(self, bodies: Sequence[str]) -> None:
        for start in range(0, len(bodies), _SEND_BATCH):
            entries = [
                {"Id": str(position), "MessageBody": body}
                for position, body in enumerate(bodies[start : start + _SEND_BATCH])
            ]
            try:
                response = self._client.send_message_batch(QueueUrl=self.queue_url, Entries=entries)
            except (ClientError, BotoCoreError) as error:
                raise TransientError(f"cannot send to {self.queue_url}: {error}") from error
            if response.get("Failed"):
                first = response["Failed"][0]
                raise TransientError(f"SQS refused message {first['Id']}: {first.get('Message')}")

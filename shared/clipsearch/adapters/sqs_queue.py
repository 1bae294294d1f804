"""The ingestion queue over botocore (sending, and the visibility of delivered messages), SQS errors as domain errors."""

from __future__ import annotations

from collections.abc import Sequence

from botocore.exceptions import BotoCoreError, ClientError

from clipsearch.errors import TransientError
from clipsearch.ports import PostponedMessage

_SEND_BATCH = 10  # SQS's SendMessageBatch limit
_VISIBILITY_BATCH = 10  # and ChangeMessageVisibilityBatch's


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


def queue_url_from_arn(client, queue_arn: str) -> str:
    """arn:aws:sqs:REGION:ACCOUNT:NAME -> the queue's URL at the client's endpoint (AWS's or a local one)."""
    parts = queue_arn.split(":")
    if len(parts) != 6 or parts[0] != "arn" or parts[2] != "sqs" or not parts[4] or not parts[5]:
        raise ValueError(f"not an SQS queue ARN: {queue_arn!r}")
    return f"{client.meta.endpoint_url.rstrip('/')}/{parts[4]}/{parts[5]}"


class SqsMessageVisibility:
    """Changes the visibility timeout of delivered messages, identified by their receipt handles."""

    def __init__(self, client) -> None:
        self._client = client

    def postpone(self, source: str, messages: Sequence[PostponedMessage]) -> None:
        try:
            queue_url = queue_url_from_arn(self._client, source)
        except ValueError as error:
            raise TransientError(str(error)) from error
        refused = []
        for start in range(0, len(messages), _VISIBILITY_BATCH):
            entries = [
                {"Id": str(position), "ReceiptHandle": message.receipt, "VisibilityTimeout": message.delay_seconds}
                for position, message in enumerate(messages[start : start + _VISIBILITY_BATCH])
            ]
            try:
                response = self._client.change_message_visibility_batch(QueueUrl=queue_url, Entries=entries)
            except (ClientError, BotoCoreError) as error:
                raise TransientError(f"cannot change visibility on {queue_url}: {error}") from error
            refused += [f"{failed.get('Code')}: {failed.get('Message')}" for failed in response.get("Failed", [])]
        if refused:
            raise TransientError(f"SQS refused {len(refused)} visibility changes on {queue_url}, first {refused[0]}")

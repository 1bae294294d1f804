"""The SeaweedFS change feed sends changes that arrive together as SendMessageBatch calls, a lone change at once."""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from clipsearch.events import parse_message
from clipsearch_tools.local.seaweed import SQS_BATCH_LIMIT, FilerEventFeed, sqs_batch_sender
from clipsearch_tools.local.template import NotificationRule
from test_local_stack import _s3, seaweed  # noqa: F401  (the `seaweed` fixture)

pytestmark = pytest.mark.integration

RULES = (NotificationRule("s3:ObjectCreated:*", "datasets/", ""),)


def _drain_keys(sqs_client, queue_url: str, expected: int, timeout: float = 30) -> list[str]:
    keys, deadline = [], time.monotonic() + timeout
    while len(keys) < expected and time.monotonic() < deadline:
        for message in sqs_client.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10,
                                                  WaitTimeSeconds=1).get("Messages", []):
            keys += [event.key for event in parse_message(message["MessageId"], message["Body"])]
            sqs_client.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])
    return keys


def test_changes_arriving_together_go_out_in_batches_and_a_lone_change_at_once(seaweed, sqs_client, tmp_path):
    s3 = _s3(seaweed.s3_url)
    s3.create_bucket(Bucket="batched")
    queue_url = sqs_client.create_queue(QueueName=f"q-{uuid.uuid4().hex[:8]}")["QueueUrl"]
    send_batch = sqs_batch_sender(sqs_client, queue_url)
    batch_sizes: list[int] = []
    warmed_up, uploads_done = threading.Event(), threading.Event()

    def recording_send_batch(bodies) -> None:
        if warmed_up.is_set():
            batch_sizes.append(len(bodies))
            if len(batch_sizes) == 1:  # hold the first send until every upload's change is in the tail
                uploads_done.wait(30)
        send_batch(bodies)

    feed = FilerEventFeed(seaweed, "batched", RULES, lambda body: pytest.fail("sent alone"), tmp_path / "tail.log",
                          send_batch=recording_send_batch)
    feed.start()
    try:
        # Changes made while the tail is still connecting can be missed on a loaded machine (seen with the
        # one-at-a-time feed too): one change seen through first, then the batch.
        for attempt in range(10):
            s3.put_object(Bucket="batched", Key=f"datasets/warm-up/{attempt}.jpg", Body=b"w")
            if _drain_keys(sqs_client, queue_url, 1, timeout=5):
                break
        time.sleep(1)
        _drain_keys(sqs_client, queue_url, 10, timeout=1)  # a late warm-up change
        warmed_up.set()
        keys = [f"datasets/d/{index:02}.jpg" for index in range(25)]
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda key: s3.put_object(Bucket="batched", Key=key, Body=key.encode()), keys))
        time.sleep(1)  # the tail prints the last changes
        uploads_done.set()
        assert sorted(_drain_keys(sqs_client, queue_url, 25)) == keys, batch_sizes
        assert sum(batch_sizes) == 25 and max(batch_sizes) == SQS_BATCH_LIMIT
        sent_before = len(batch_sizes)
        s3.put_object(Bucket="batched", Key="datasets/d/alone.jpg", Body=b"x")
        assert _drain_keys(sqs_client, queue_url, 1, timeout=10) == ["datasets/d/alone.jpg"]
        assert batch_sizes[sent_before:] == [1]
    finally:
        feed.stop()

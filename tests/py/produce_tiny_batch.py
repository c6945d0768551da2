"""Produces N empty records (no key, no value) to one partition with librdkafka, in one zstd
batch (for N up to 1,000,000; message.max.bytes is raised because librdkafka caps a batch's
uncompressed size by it, ~109,000 such records at the default 1 MB): the case where a few bytes
of compressed batch decode into a very large number of records.

usage: produce_tiny_batch.py BOOTSTRAP TOPIC PARTITION N
prints {"produced": N, "batches": batches made, "largest": records in the largest batch}
(librdkafka's statistics: each report's batchcnt histogram covers the time since the last one)
"""
import json, sys
from confluent_kafka import Producer

bootstrap, topic, partition, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
seen = {"batches": 0, "largest": 0}
def on_stats(s):
    for t in json.loads(s).get("topics", {}).values():
        h = t.get("batchcnt", {})
        seen["batches"] += h.get("cnt", 0)
        seen["largest"] = max(seen["largest"], h.get("max", 0))
p = Producer({"bootstrap.servers": bootstrap, "compression.type": "zstd",
              "linger.ms": 5000, "batch.num.messages": 1_000_000, "batch.size": 100_000_000,
              "queue.buffering.max.messages": 2_000_000,
              "queue.buffering.max.kbytes": 2_000_000,
              "message.max.bytes": 20_000_000,
              "enable.idempotence": False, "acks": "all",
              "statistics.interval.ms": 100, "stats_cb": on_stats})
for _ in range(n):
    p.produce(topic, value=None, partition=partition)
assert p.flush(60) == 0, "undelivered records"
p.poll(0.5)
print(json.dumps({"produced": n, **seen}))

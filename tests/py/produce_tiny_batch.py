"""Produces N empty records (no key, no value) to one partition with librdkafka, made into as few
zstd batches as librdkafka allows (one, for N up to 1,000,000): the case where a few bytes of
compressed batch decode into a very large number of records.

usage: produce_tiny_batch.py BOOTSTRAP TOPIC PARTITION N
prints {"produced": N, "requests": produce requests sent (librdkafka's statistics)}
"""
import json, sys
from confluent_kafka import Producer

bootstrap, topic, partition, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
stats = {}
def on_stats(s):
    stats.update(json.loads(s))
p = Producer({"bootstrap.servers": bootstrap, "compression.type": "zstd",
              "linger.ms": 5000, "batch.num.messages": 1_000_000, "batch.size": 100_000_000,
              "queue.buffering.max.messages": 2_000_000,
              "queue.buffering.max.kbytes": 2_000_000,
              "enable.idempotence": False, "acks": "all",
              "statistics.interval.ms": 100, "stats_cb": on_stats})
for _ in range(n):
    p.produce(topic, value=None, partition=partition)
assert p.flush(60) == 0, "undelivered records"
p.poll(0.3)
reqs = sum(b.get("req", {}).get("Produce", 0) for b in stats.get("brokers", {}).values())
batches = sum(t.get("batchcnt", {}).get("cnt", 0) for t in stats.get("topics", {}).values())
print(json.dumps({"produced": n, "requests": reqs, "batches": batches}))

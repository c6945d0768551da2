"""Reads N records from every partition of TOPIC from the beginning with librdkafka (no group).

usage: consume.py BOOTSTRAP TOPIC N TIMEOUT_S
prints [{"partition","offset","ts","key","value","headers"}] (hex strings; ts: record timestamp, ms)
CONSUME_CONFIG (optional): a JSON object of extra librdkafka settings (e.g. TLS)
"""
import json, os, sys, time
from confluent_kafka import Consumer, TopicPartition, OFFSET_BEGINNING

bootstrap, topic, n, timeout = sys.argv[1:5]
c = Consumer({"bootstrap.servers": bootstrap, "group.id": "consume-py", "enable.auto.commit": False,
              **json.loads(os.environ.get("CONSUME_CONFIG") or "{}")})
md = c.list_topics(topic, timeout=10)
c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in md.topics[topic].partitions])
out = []
deadline = time.time() + float(timeout)
while len(out) < int(n) and time.time() < deadline:
    m = c.poll(0.2)
    if m is None or m.error():
        continue
    out.append({"partition": m.partition(), "offset": m.offset(), "ts": m.timestamp()[1],
                "key": (m.key() or b"").hex(), "value": (m.value() or b"").hex(),
                "headers": {k: (v or b"").hex() for k, v in (m.headers() or [])}})
c.close()
print(json.dumps(out))

"""Produces N keyed records with headers (incl. proto-name) using librdkafka.

usage: produce.py BOOTSTRAP TOPIC COMPRESSION N [BATCH]
BATCH=1 flushes after every record (one record per produce request).
prints the records sent as JSON: [{"key","value","headers"}] (hex strings)
"""
import json, sys
from confluent_kafka import Producer

bootstrap, topic, codec, n = sys.argv[1:5]
one_per_batch = len(sys.argv) > 5 and sys.argv[5] == "1"
p = Producer({"bootstrap.servers": bootstrap, "compression.type": codec, "linger.ms": 5,
              "partitioner": "murmur2_random", "acks": "all"})
sent = []
for i in range(int(n)):
    key = f"key-{i}".encode()
    value = bytes([i % 256]) * (i % 50) + f"value-{i}".encode()
    headers = [("proto-name", b"tensorflow.serving.PredictRequest"), ("n", str(i).encode())]
    p.produce(topic, value=value, key=key, headers=headers)
    sent.append({"key": key.hex(), "value": value.hex(), "headers": {k: v.hex() for k, v in headers}})
    if one_per_batch:
        p.flush(10)
assert p.flush(20) == 0, "undelivered records"
print(json.dumps(sent))

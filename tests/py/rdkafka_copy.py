"""A librdkafka (confluent-kafka) group member as users write one, for the bench's broker-cost
rows: it consumes INPUT and, unless OUTPUT is "-", produces every message to OUTPUT (a plain
consume -> produce copy). Offsets are committed the way librdkafka does by default
(enable.auto.commit, every 5 s, of the messages handed to the application).

usage: rdkafka_copy.py BOOTSTRAP INPUT OUTPUT|- GROUP FETCH_WAIT_MS
The session timeout is 4 s and the heartbeat 1 s, as the bench gives kafka-infer
(--session-timeout 4s, heartbeat a quarter of it). Stops on SIGTERM (leaves the group).
"""
import signal, sys
from confluent_kafka import Consumer, Producer

bootstrap, src, dst, group, fetch_wait = sys.argv[1:6]
c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "client.id": "librdkafka-bench",
              "auto.offset.reset": "earliest", "fetch.wait.max.ms": int(fetch_wait),
              "session.timeout.ms": 4000, "heartbeat.interval.ms": 1000})
p = None
if dst != "-":
    p = Producer({"bootstrap.servers": bootstrap, "client.id": "librdkafka-bench",
                  "linger.ms": 5, "acks": "all"})
c.subscribe([src])
running = True
signal.signal(signal.SIGTERM, lambda *_: globals().update(running=False))
while running:
    m = c.poll(0.1)
    if p is not None:
        if m is not None and not m.error():
            p.produce(dst, m.value(), key=m.key(), headers=m.headers())
        p.poll(0)
if p is not None:
    p.flush(10)
c.close()

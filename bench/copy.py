"""(a) A plain consume -> produce copy with no model call, as a user would write it with
confluent-kafka: poll, produce, commit asynchronously every 1000 records.

usage: copy.py BOOTSTRAP INPUT OUTPUT GROUP
"""
import signal, sys
from confluent_kafka import Consumer, Producer

bootstrap, src, dst, group = sys.argv[1:5]
c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "auto.offset.reset": "earliest",
              "enable.auto.commit": False, "fetch.wait.max.ms": 10})
p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "acks": "all"})
c.subscribe([src])
running = True
signal.signal(signal.SIGTERM, lambda *_: globals().update(running=False))
n = 0
while running:
    for m in c.consume(500, 0.1):
        if m.error():
            continue
        p.produce(dst, m.value(), key=m.key(), headers=m.headers())
        n += 1
        if n % 1000 == 0:
            c.commit(asynchronous=True)
    p.poll(0)
p.flush(10)
c.close()

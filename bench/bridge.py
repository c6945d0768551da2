"""(b) A hand-written Python bridge as a user would write it: confluent-kafka, one HTTP call at
a time to the model, produce the answer, flush, commit after produce.

usage: bridge.py BOOTSTRAP INPUT OUTPUT GROUP MODEL_URL
"""
import http.client, signal, sys, urllib.parse
from confluent_kafka import Consumer, Producer

bootstrap, src, dst, group, url = sys.argv[1:6]
u = urllib.parse.urlparse(url)
conn = http.client.HTTPConnection(u.hostname, u.port)
c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "auto.offset.reset": "earliest",
              "enable.auto.commit": False, "fetch.wait.max.ms": 10})
p = Producer({"bootstrap.servers": bootstrap, "acks": "all"})
c.subscribe([src])
running = True
signal.signal(signal.SIGTERM, lambda *_: globals().update(running=False))
while running:
    m = c.poll(0.1)
    if m is None or m.error():
        continue
    conn.request("POST", u.path, body=m.value(), headers={"content-type": "application/json"})
    r = conn.getresponse()
    body = r.read()
    p.produce(dst, body, key=m.key(), headers=m.headers())
    p.flush(10)
    c.commit(message=m, asynchronous=False)
c.close()

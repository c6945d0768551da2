"""A librdkafka group member: prints its assignment as JSON lines until killed or SECONDS pass.

usage: group_member.py BOOTSTRAP GROUP TOPIC SESSION_MS SECONDS [STRATEGY]
STRATEGY: partition.assignment.strategy (default range,roundrobin; e.g. cooperative-sticky)
"""
import json, sys, time
from confluent_kafka import Consumer

bootstrap, group, topic, session_ms, seconds = sys.argv[1:6]
strategy = sys.argv[6] if len(sys.argv) > 6 else "range,roundrobin"
owned = set()

def show():
    print(json.dumps({"partitions": sorted(owned)}), flush=True)

def on_assign(c, parts):
    owned.update(p.partition for p in parts)
    show()

def on_revoke(c, parts):
    owned.difference_update(p.partition for p in parts)
    show()

c = Consumer({
    "bootstrap.servers": bootstrap,
    "group.id": group,
    "session.timeout.ms": int(session_ms),
    "heartbeat.interval.ms": max(100, int(session_ms) // 4),
    "partition.assignment.strategy": strategy,
    "auto.offset.reset": "earliest",
    "enable.auto.commit": False,
    "client.id": "librdkafka-member",
})
c.subscribe([topic], on_assign=on_assign, on_revoke=on_revoke)
deadline = time.time() + float(seconds)
while time.time() < deadline:
    c.poll(0.1)
c.close()
owned.clear()
show()

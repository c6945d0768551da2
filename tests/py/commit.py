"""Commits offsets for a group with librdkafka, without joining it.

usage: commit.py BOOTSTRAP GROUP TOPIC P=OFFSET [P=OFFSET ...]
"""
import sys
from confluent_kafka import Consumer, TopicPartition

bootstrap, group, topic = sys.argv[1:4]
offsets = [TopicPartition(topic, int(p), int(o)) for p, o in (a.split("=") for a in sys.argv[4:])]
c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
c.commit(offsets=offsets, asynchronous=False)
c.close()

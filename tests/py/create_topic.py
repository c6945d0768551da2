"""Creates a topic with configs, with librdkafka's admin client.

usage: create_topic.py BOOTSTRAP TOPIC PARTITIONS [KEY=VALUE ...]
"""
import sys
from confluent_kafka.admin import AdminClient, NewTopic

bootstrap, topic, partitions = sys.argv[1], sys.argv[2], int(sys.argv[3])
config = dict(kv.split("=", 1) for kv in sys.argv[4:])
a = AdminClient({"bootstrap.servers": bootstrap})
for f in a.create_topics([NewTopic(topic, partitions, 1, config=config)]).values():
    f.result(timeout=10)
print("ok")

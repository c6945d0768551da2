"""Reads a group's committed offsets and the topic's end offsets the way KEDA does
(OffsetFetch + ListOffsets latest), with librdkafka's admin client.

usage: admin.py BOOTSTRAP GROUP TOPIC
prints {"committed": {p: offset|-1}, "end": {p: offset}, "lag": total}
"""
import json, sys
from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

bootstrap, group, topic = sys.argv[1:4]
a = AdminClient({"bootstrap.servers": bootstrap})
md = a.list_topics(topic, timeout=10)
parts = sorted(md.topics[topic].partitions)
req = ConsumerGroupTopicPartitions(group, [TopicPartition(topic, p) for p in parts])
got = a.list_consumer_group_offsets([req])[group].result(timeout=10)
committed = {tp.partition: tp.offset for tp in got.topic_partitions}
ends = a.list_offsets({TopicPartition(topic, p): OffsetSpec.latest() for p in parts})
end = {tp.partition: f.result(timeout=10).offset for tp, f in ends.items()}
lag = sum(end[p] - committed[p] if committed[p] >= 0 else end[p] for p in parts)
print(json.dumps({"committed": committed, "end": end, "lag": lag}))

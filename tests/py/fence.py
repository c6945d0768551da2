"""Fences a transactional producer: a librdkafka producer with the same transactional.id calls
init_transactions (InitProducerId), which bumps the producer epoch and aborts the old producer's
open transaction; the old producer's next Produce or commit is refused as fenced.

usage: fence.py BOOTSTRAP TRANSACTIONAL_ID
prints "fenced"
"""
import sys
from confluent_kafka import Producer

bootstrap, txn_id = sys.argv[1:3]
p = Producer({"bootstrap.servers": bootstrap, "transactional.id": txn_id,
              "transaction.timeout.ms": 30000})
p.init_transactions(20)
print("fenced")

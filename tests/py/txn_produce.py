"""Writes transactions to one partition with a transactional librdkafka producer.

usage: txn_produce.py BOOTSTRAP TOPIC PARTITION COMPRESSION SPEC [SPEC...]
SPEC is commit:NAME:N, abort:NAME:N (one transaction of records NAME1..NAMEn, committed or
aborted) or plain:NAME:N (records from a non-transactional producer, after everything before).
Keys are the values; every record has a header ("n", its index).
prints {"committed": [values in write order], "aborted": [...]} as JSON
"""
import json, sys, uuid
from confluent_kafka import Producer

bootstrap, topic, partition, codec = sys.argv[1:5]
partition = int(partition)
specs = [s.split(":") for s in sys.argv[5:]]

common = {"bootstrap.servers": bootstrap, "compression.type": codec, "linger.ms": 5,
          "acks": "all"}
txn = Producer({**common, "transactional.id": f"txn-produce-{uuid.uuid4()}",
                "transaction.timeout.ms": 30000})
txn.init_transactions(20)
plain = None
out = {"committed": [], "aborted": []}
for kind, name, n in specs:
    values = [f"{name}{i}".encode() for i in range(1, int(n) + 1)]
    if kind == "plain":
        if plain is None:
            plain = Producer({**common, "enable.idempotence": False})
        for i, v in enumerate(values):
            plain.produce(topic, value=v, key=v, partition=partition, headers=[("n", str(i).encode())])
        assert plain.flush(20) == 0, "undelivered plain records"
        out["committed"] += [v.decode() for v in values]
        continue
    txn.begin_transaction()
    for i, v in enumerate(values):
        txn.produce(topic, value=v, key=v, partition=partition, headers=[("n", str(i).encode())])
    txn.flush(20)
    if kind == "commit":
        txn.commit_transaction(20)
        out["committed"] += [v.decode() for v in values]
    elif kind == "abort":
        txn.abort_transaction(20)
        out["aborted"] += [v.decode() for v in values]
    else:
        raise SystemExit(f"unknown spec kind {kind}")
print(json.dumps(out))

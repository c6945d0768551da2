"""Protobuf requests made with the real servers' own generated classes (independent of ours).

usage: make_proto.py v2 N        ModelInferRequest for model `doubler`, x = [i, 0.5] (FP32)
       make_proto.py v2raw N     the same with raw_input_contents
       make_proto.py seldon N    SeldonMessage with data.ndarray [[i, 1]]
prints a JSON list of hex strings
"""
import json, struct, sys

kind, n = sys.argv[1], int(sys.argv[2])
out = []
if kind.startswith("v2"):
    from mlserver.grpc import dataplane_pb2 as pb
    for i in range(n):
        t = pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[2])
        req = pb.ModelInferRequest(model_name="doubler", id=f"r{i}")
        if kind == "v2raw":
            req.raw_input_contents.append(struct.pack("<2f", i, 0.5))
        else:
            t.contents.fp32_contents.extend([i, 0.5])
        req.inputs.append(t)
        out.append(req.SerializeToString().hex())
elif kind == "seldon":
    from google.protobuf import json_format
    from seldon_core.proto import prediction_pb2 as pb
    for i in range(n):
        m = json_format.ParseDict({"data": {"ndarray": [[i, 1]]}}, pb.SeldonMessage())
        out.append(m.SerializeToString().hex())
print(json.dumps(out))

"""Compares our compiled descriptor set with the descriptors a real server package ships.

usage: check_protos.py OUR_SET.bin MODULE [MODULE ...]
Every message the modules define must exist in ours with the same field numbers, types and
labels (wire compatibility). Prints a JSON report; exits 1 on any mismatch.
"""
import importlib, json, sys
from google.protobuf import descriptor_pb2

ours_set = descriptor_pb2.FileDescriptorSet()
ours_set.ParseFromString(open(sys.argv[1], "rb").read())
ours = {}

def walk(prefix, msgs):
    for m in msgs:
        name = f"{prefix}.{m.name}" if prefix else m.name
        ours[name] = {f.name: (f.number, f.type, f.label, f.type_name.lstrip(".")) for f in m.field}
        walk(name, m.nested_type)

for f in ours_set.file:
    walk(f.package, f.message_type)

problems, checked = [], 0
for modname in sys.argv[2:]:
    mod = importlib.import_module(modname)
    fdp = descriptor_pb2.FileDescriptorProto()
    mod.DESCRIPTOR.CopyToProto(fdp)

    def theirs(prefix, msgs):
        global checked
        for m in msgs:
            name = f"{prefix}.{m.name}" if prefix else m.name
            if m.options.map_entry:
                continue
            if name not in ours:
                problems.append(f"{name}: missing in ours")
                continue
            for f in m.field:
                want = (f.number, f.type, f.label, f.type_name.lstrip("."))
                got = ours[name].get(f.name)
                checked += 1
                if got is None:
                    problems.append(f"{name}.{f.name}: missing in ours")
                elif got[:3] != want[:3] or got[3].split(".")[-1] != want[3].split(".")[-1]:
                    problems.append(f"{name}.{f.name}: ours {got}, theirs {want}")
            theirs(name, m.nested_type)

    theirs(fdp.package, fdp.message_type)
print(json.dumps({"checked_fields": checked, "problems": problems}))
sys.exit(1 if problems else 0)

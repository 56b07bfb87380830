"""`PreloadInput` (a prepared hop's input sent ahead of its lease) is a versioned addition:
an agent built from the wire contract before it reads the task stream as it always did."""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from protocols.v1 import baton_pb2 as pb


def _task_before_preload() -> type:
    """`Task` as generated from baton.proto before `PreloadInput` was added."""
    proto = descriptor_pb2.FileDescriptorProto()
    pb.DESCRIPTOR.CopyToProto(proto)
    for message in proto.message_type:
        if message.name == "Task":
            kept = [f for f in message.field if f.name != "preload"]
            del message.field[:]
            message.field.extend(kept)
    kept_messages = [m for m in proto.message_type if m.name != "PreloadInput"]
    del proto.message_type[:]
    proto.message_type.extend(kept_messages)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("baton.v1.Task"))


def test_an_agent_that_predates_preload_inputs_sees_a_task_of_no_kind_and_skips_it() -> None:
    old_task = _task_before_preload()
    sent = pb.Task(preload=pb.PreloadInput(run_id="r", hop_id="h", hop_index=1,
                                           checkpoint=pb.CheckpointRef(sha256="a" * 64),
                                           bundle=b"\x00" * 1000))  # fmt: skip

    received = old_task.FromString(sent.SerializeToString())

    # An agent's stream loop dispatches on the kind: no kind, no branch, the next task is read.
    assert received.WhichOneof("kind") is None
    # Tasks it knows still parse as ever, in the same stream.
    lease = old_task.FromString(pb.Task(hop=pb.HopTask(hop_id="h")).SerializeToString())
    assert lease.WhichOneof("kind") == "hop" and lease.hop.hop_id == "h"

"""A stage's transport: the gRPC servicer (decode, validate, hand over to the StageLoop, encode replies).

A microbatch arrives on the Link stream from the previous stage (or the coordinator) and is
acknowledged as soon as it is validated and queued (`stage/loop.py` runs it).
"""

from __future__ import annotations

import os
import time

import grpc

from stagecoach.errors import StagecoachError, StaleBatchError, WireError
from stagecoach.proto import codec
from stagecoach.proto import stagecoach_pb2 as pb
from stagecoach.proto import stagecoach_pb2_grpc as pb_grpc
from stagecoach.proto.link import LinkAssembler
from stagecoach.proto.server import grpc_status
from stagecoach.stage.loop import StageLoop


class StageServicer(pb_grpc.StageServicer):
    """Transport only: decode and validate, hand over to the StageLoop, encode replies."""

    def __init__(self, service: StageLoop, info: pb.StageInfo) -> None:
        self.service = service
        self.info = info

    def Link(self, request_iterator, context: grpc.ServicerContext):
        """One sender's microbatches, each decoded, validated and queued, then answered in order; a refused one does not
        end the stream."""
        assembler = LinkAssembler(self.service.max_message_bytes)
        for frame in request_iterator:
            done = assembler.add(frame)
            if done is None:
                continue
            msg, data, error = done
            batch_id, received = (msg.batch_id if msg is not None else 0), time.monotonic_ns()
            try:
                if error is not None:
                    raise WireError(error)
                # before decoding it: cheap, and the common refusal after a recovery
                if self.service.is_stale(batch_id):
                    raise StaleBatchError(f"microbatch {batch_id} is from before a recovery")
                batch, inputs = codec.decode_microbatch(msg, data=data)
                self.service.admit(batch, inputs, msg.timings, received)
            except StagecoachError as e:
                yield pb.LinkAck(
                    batch_id=batch_id, code=grpc_status(e).value[0], error=f"stage {self.service.index}: {e}"
                )
                continue
            yield pb.LinkAck(batch_id=batch_id)

    def Info(self, request: pb.InfoRequest, context: grpc.ServicerContext) -> pb.StageInfo:
        info = pb.StageInfo()
        info.CopyFrom(self.info)
        info.pid = os.getpid()
        return info

    def Health(self, request: pb.HealthRequest, context: grpc.ServicerContext) -> pb.HealthReply:
        s = self.service
        return pb.HealthReply(
            serving=True,
            batches_done=s.batches_done,
            queue_depth=s.queue_depth,
            compute_ns_total=s.compute_ns_total,
            errors=s.errors,
        )

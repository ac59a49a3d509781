"""The one place a gRPC server starts (stage or coordinator), its channel options, and errors as gRPC status codes."""

from __future__ import annotations

from concurrent import futures

import grpc

from stagecoach.errors import error_kind
from stagecoach.proto import stagecoach_pb2 as pb
from stagecoach.proto import stagecoach_pb2_grpc as pb_grpc
from stagecoach.proto.link import parse_link_frame
from stagecoach.proto.security import LinkSecurity, TokenCheck


def grpc_status(error: BaseException) -> grpc.StatusCode:
    """The error table's gRPC status for this error (errors.ERROR_TABLE)."""
    return grpc.StatusCode[error_kind(error).grpc_status]


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # A stream's HTTP/2 window starts at 64 KiB and grows only as gRPC probes the link, so a
        # microbatch of a few hundred KiB would wait for window updates; start it at 8 MiB.
        ("grpc.http2.lookahead_bytes", 8 << 20),
    ]


def add_stage_servicer(servicer: pb_grpc.StageServicer, server: grpc.Server) -> None:
    """pb_grpc.add_StageServicer_to_server, except that Link's frames are parsed by parse_link_frame (chunks without a copy)."""
    handlers = {
        "Link": grpc.stream_stream_rpc_method_handler(servicer.Link, parse_link_frame, pb.LinkAck.SerializeToString),
        "Info": grpc.unary_unary_rpc_method_handler(
            servicer.Info, pb.InfoRequest.FromString, pb.StageInfo.SerializeToString
        ),
        "Health": grpc.unary_unary_rpc_method_handler(
            servicer.Health, pb.HealthRequest.FromString, pb.HealthReply.SerializeToString
        ),
    }
    assert set(handlers) == set(pb.DESCRIPTOR.services_by_name["Stage"].methods_by_name), (
        "a Stage method without a handler"
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("stagecoach.v1.Stage", handlers),))
    server.add_registered_method_handlers("stagecoach.v1.Stage", handlers)


def start_server(
    servicer: pb_grpc.StageServicer | pb_grpc.CoordinatorServicer,
    host: str,
    port: int,
    max_message_bytes: int,
    security: LinkSecurity | None = None,
    max_workers: int = 16,  # each open Link holds one for its lifetime
) -> tuple[grpc.Server, str]:
    """Starts a gRPC server for a Stage or Coordinator servicer on host:port (0: any free port).

    With security, every call must carry the link token (else UNAUTHENTICATED), over mutual TLS if configured.
    """
    interceptors = [TokenCheck(security.token)] if security is not None else []
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers),
        options=channel_options(max_message_bytes),
        interceptors=interceptors,
    )
    if isinstance(servicer, pb_grpc.StageServicer):
        add_stage_servicer(servicer, server)
    else:
        pb_grpc.add_CoordinatorServicer_to_server(servicer, server)
    if security is not None and security.tls:
        bound = server.add_secure_port(f"{host}:{port}", security.server_credentials())
    else:
        bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}")
    server.start()
    return server, f"{host}:{bound}"

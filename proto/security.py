"""Stage-link security: a shared token in gRPC metadata on every call, and optional mutual TLS."""

from __future__ import annotations

import hmac
from collections import namedtuple
from dataclasses import dataclass
from pathlib import Path

import grpc

from stagecoach.errors import ConfigError

TOKEN_HEADER = "x-stagecoach-token"


@dataclass(slots=True, frozen=True)
class LinkSecurity:
    """What every stage and the coordinator share: the token, and TLS files if mutual TLS is on."""

    token: str
    tls_cert: str | None = None  # this process's certificate (PEM)
    tls_key: str | None = None  # its private key (PEM)
    tls_ca: str | None = None  # the CA that signs every party's certificate (PEM)

    def __post_init__(self) -> None:
        if not self.token:
            raise ConfigError("the stage-link token is empty")
        given = [f for f in (self.tls_cert, self.tls_key, self.tls_ca) if f]
        if given and len(given) != 3:
            raise ConfigError(
                "mutual TLS needs all three of transport.tls_cert, transport.tls_key and transport.tls_ca"
            )
        for path in given:
            if not Path(path).is_file():
                raise ConfigError(f"TLS file {path} does not exist")

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    def _read(self) -> tuple[bytes, bytes, bytes]:
        return Path(self.tls_key).read_bytes(), Path(self.tls_cert).read_bytes(), Path(self.tls_ca).read_bytes()

    def server_credentials(self) -> grpc.ServerCredentials:
        key, cert, ca = self._read()
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        key, cert, ca = self._read()
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


class _ClientCallDetails(
    namedtuple("_ClientCallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")),
    grpc.ClientCallDetails,
):
    pass


class _AddToken(grpc.UnaryUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    def __init__(self, token: str) -> None:
        self._token = token

    def _with_token(self, details):
        metadata = list(details.metadata or []) + [(TOKEN_HEADER, self._token)]
        return _ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready, details.compression
        )

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._with_token(details), request_iterator)


class TokenCheck(grpc.ServerInterceptor):
    """Refuses, with UNAUTHENTICATED, every call that does not carry the link token."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong stage-link token")

        self._deny = grpc.unary_unary_rpc_method_handler(deny)
        self._deny_stream = grpc.stream_stream_rpc_method_handler(deny)

    def intercept_service(self, continuation, details):
        given = dict(details.invocation_metadata or ()).get(TOKEN_HEADER, "")
        if hmac.compare_digest(given.encode(), self._token):
            return continuation(details)
        handler = continuation(details)
        return self._deny_stream if handler is not None and handler.request_streaming else self._deny


def open_channel(address: str, options: list, security: LinkSecurity | None) -> grpc.Channel:
    """A channel to a stage or the coordinator that sends the token on every call (over TLS if configured)."""
    if security is None:
        return grpc.insecure_channel(address, options=options)
    if security.tls:
        channel = grpc.secure_channel(address, security.channel_credentials(), options=options)
    else:
        channel = grpc.insecure_channel(address, options=options)
    return grpc.intercept_channel(channel, _AddToken(security.token))

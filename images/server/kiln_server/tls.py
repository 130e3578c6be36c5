"""TLS on the inference ports (--tls-cert-file, --tls-key-file; docs/security.md), with the certificate renewed
without a restart.

The pair usually comes from a ``kubernetes.io/tls`` Secret volume, which the kubelet updates by writing a new
folder and swapping the ``..data`` symlink, so both files change at once and a path never shows half a file. The
files are stat()ed (through the symlinks) every second; when either changes, the pair is loaded into a fresh
context and new handshakes get it: REST through the listening context's SNI callback, which every handshake passes
through (with or without a server name), gRPC through grpcio's certificate fetcher. A pair that does not load (a
key that does not match, a file being written by hand) keeps the previous one serving and is tried again at the
next check. Connections already open keep the certificate they were made with."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import ssl
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from .metrics import TlsMetrics

if TYPE_CHECKING:
    import grpc

log = logging.getLogger("kiln_server.tls")

CHECK_INTERVAL_S = 1.0
_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL)
_PEM_KEY = re.compile(rb"-----BEGIN ([A-Z ]*)PRIVATE KEY-----")


class TlsError(Exception):
    """The pair cannot be served; ``flag`` names the file at fault."""

    def __init__(self, flag: str, message: str) -> None:
        super().__init__(f"{flag}: {message}")
        self.flag = flag


@dataclass(frozen=True)
class Pair:
    """One loaded certificate and key: the context REST handshakes use, the bytes gRPC gets, and when it expires."""

    context: ssl.SSLContext
    cert_pem: bytes
    key_pem: bytes
    not_after: float
    signature: tuple[int, ...]
    generation: int


def _signature(cert_file: str, key_file: str) -> tuple[int, ...]:
    """What changes when either file is replaced: stat() follows the Secret volume's symlinks to the files."""
    out: list[int] = []
    for path in (cert_file, key_file):
        st = os.stat(path)
        out += [st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size]
    return tuple(out)


def _no_password() -> str:
    # An encrypted key would make OpenSSL prompt on the terminal; an empty password makes it fail instead.
    return ""


def server_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def load_pair(cert_file: str, key_file: str, generation: int = 0) -> Pair:
    """Read and check the pair; TlsError naming the flag whose file is wrong."""
    try:
        before = _signature(cert_file, key_file)
        with open(cert_file, "rb") as f:
            cert_pem = f.read()
        with open(key_file, "rb") as f:
            key_pem = f.read()
    except OSError as e:
        flag = "--tls-key-file" if e.filename == key_file else "--tls-cert-file"
        raise TlsError(flag, f"cannot read {e.filename}: {e.strerror or e}") from None
    first = _PEM_CERT.search(cert_pem)
    if first is None:
        raise TlsError("--tls-cert-file", f"{cert_file}: no PEM certificate in it")
    try:
        not_after = certificate_not_after(first.group())
    except ValueError as e:
        raise TlsError("--tls-cert-file", f"{cert_file}: the first certificate cannot be read ({e})") from None
    key = _PEM_KEY.search(key_pem)
    if key is None:
        raise TlsError("--tls-key-file", f"{key_file}: no PEM private key in it")
    if b"ENCRYPTED" in key.group() or b"Proc-Type: 4,ENCRYPTED" in key_pem:
        raise TlsError("--tls-key-file", f"{key_file}: the key is encrypted; it must be unencrypted")
    context = server_context()
    try:
        context.load_cert_chain(cert_file, key_file, password=_no_password)
    except ssl.SSLError as e:
        if e.reason == "KEY_VALUES_MISMATCH":
            raise TlsError("--tls-key-file", f"{key_file} is not the key of the certificate in {cert_file}") from None
        raise TlsError(
            "--tls-key-file",
            f"{key_file} cannot be loaded with {cert_file} ({e.reason or e}): a truncated key, or a damaged "
            "certificate after the first",
        ) from None
    except OSError as e:
        raise TlsError("--tls-cert-file", f"cannot read the pair: {e.strerror or e}") from None
    # The bytes gRPC serves must be the files the context was loaded from: a pair that changed meanwhile is
    # loaded at the next check.
    if _signature(cert_file, key_file) != before:
        raise TlsError("--tls-cert-file", f"{cert_file} or {key_file} changed while being loaded")
    return Pair(context, cert_pem, key_pem, not_after, before, generation)


class CertificateWatcher:
    """The pair being served, and what replaces it when the files change."""

    def __init__(self, cert_file: str, key_file: str) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self.pair = load_pair(cert_file, key_file)
        self.metrics: TlsMetrics | None = None
        self._failed: tuple[Any, ...] | None = None  # the signature (or error) last refused: counted and logged once
        self._grpc_generation = 0
        self._listening: ssl.SSLContext | None = None

    def bind_metrics(self, metrics: TlsMetrics) -> None:
        self.metrics = metrics
        metrics.expiry.set(self.pair.not_after)

    def check(self) -> bool:
        """Load the files if they changed; True when a new pair now serves. Never raises: a pair that does not
        load leaves the current one serving (a WARNING once per distinct attempt) and is tried again next time."""
        try:
            signature = _signature(self.cert_file, self.key_file)
        except OSError as e:
            self._refused(("stat", str(e)), f"cannot stat the files: {e.strerror or e}")
            return False
        if signature == self.pair.signature:
            return False
        try:
            pair = load_pair(self.cert_file, self.key_file, self.pair.generation + 1)
        except TlsError as e:
            self._refused(signature, str(e))
            return False
        self.pair = pair
        self._failed = None
        if self.metrics is not None:
            self.metrics.reloads["success"].inc()
            self.metrics.expiry.set(pair.not_after)
        log.info(
            "TLS: loaded the renewed certificate from %s (expires %s)",
            self.cert_file,
            datetime.fromtimestamp(pair.not_after, UTC).isoformat(),
        )
        return True

    def _refused(self, attempt: tuple[Any, ...], message: str) -> None:
        if attempt == self._failed:
            return
        self._failed = attempt
        if self.metrics is not None:
            self.metrics.reloads["failure"].inc()
        log.warning("TLS: keeping the current certificate; the changed files cannot be served: %s", message)

    async def watch(self, interval: float = CHECK_INTERVAL_S) -> None:
        while True:
            await asyncio.sleep(interval)  # the check's period: two stat() calls each time
            try:
                self.check()
            except Exception:  # a bug: the current pair keeps serving, and the next check runs all the same
                log.exception("TLS: checking %s failed", self.cert_file)

    # ------------------------------------------------------------------ REST
    def rest_context(self) -> ssl.SSLContext:
        """The listening context: every handshake is switched to the current pair's context in the SNI callback,
        which OpenSSL calls for each ClientHello, with or without a server name (probes to a pod IP send none)."""
        if self._listening is None:
            self._listening = self.pair.context  # the first pair's; later handshakes are switched away from it
            self._listening.sni_callback = self._switch
        return self._listening

    def _switch(self, sslobj: Any, _server_name: str | None, context: ssl.SSLContext) -> None:
        current = self.pair.context
        if context is not current:
            sslobj.context = current

    # ------------------------------------------------------------------ gRPC
    def grpc_credentials(self) -> grpc.ServerCredentials:
        import grpc

        self._grpc_generation = self.pair.generation
        pair = self.pair
        return grpc.dynamic_ssl_server_credentials(
            grpc.ssl_server_certificate_configuration([(pair.key_pem, pair.cert_pem)]),
            self._grpc_fetch,
            require_client_authentication=False,
        )

    def _grpc_fetch(self) -> Any:
        """grpcio asks before each handshake; a configuration only when the pair changed since it last got one."""
        import grpc

        pair = self.pair
        if pair.generation == self._grpc_generation:
            return None
        self._grpc_generation = pair.generation
        return grpc.ssl_server_certificate_configuration([(pair.key_pem, pair.cert_pem)])


def certificate_not_after(pem: bytes) -> float:
    """The notAfter of a PEM certificate, in seconds since the epoch. ``cryptography`` is imported here: a server
    without TLS never loads it."""
    from cryptography import x509

    return x509.load_pem_x509_certificate(pem).not_valid_after_utc.timestamp()


def describe_expiry(not_after: float) -> str:
    days = (not_after - time.time()) / 86400
    when = datetime.fromtimestamp(not_after, UTC).isoformat()
    return f"expires {when} (in {days:.1f} days)" if days >= 0 else f"expired {when}: clients will refuse it"

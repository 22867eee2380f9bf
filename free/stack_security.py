"""SeaweedFS's own doors, shut: only the S3 API (which checks the access key) serves the stack's data.

Left open, ``weed mini``'s filer port serves anonymous GET/PUT/DELETE of every object, its master
port deletes whole collections (``/col/delete``) and hands out volume writes (``/dir/assign``), and
its gRPC ports take any client (``weed shell``). Loopback binding does not help against another
local user. So the S3 server is started with (all through its environment, never its command line):

* ``-disableHttp`` (a flag, in :func:`free.stack.services`): no filer HTTP API, no master admin
  endpoints; the S3 gateway talks to them over gRPC;
* JWT signing keys for volume writes and reads and for filer writes and reads: the volume port,
  which the S3 gateway still uploads chunks to over HTTP, answers 401 without a token only the
  server's own parts can sign;
* mutual TLS on every gRPC port, with a certificate authority made for this stack: a client
  without the stack's key gets no TLS session.

Keys and certificates are new at each start of the S3 server (nothing but the server uses them),
written owner-only under ``<state>/s3/tls``.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
from pathlib import Path

# Every gRPC role weed reads a certificate for ([grpc.<role>] in `weed scaffold -config=security`);
# one certificate serves all of them, as client and as server.
GRPC_ROLES = ("master", "volume", "filer", "s3", "admin", "worker", "msg_broker", "msg_agent", "mq", "client")


def weed_security_env(tls_dir: Path) -> dict[str, str]:
    """The environment that turns on SeaweedFS's security (``WEED_*`` overrides ``security.toml``)."""
    ca, cert, key = write_stack_certificates(tls_dir)
    env = {
        "WEED_JWT_SIGNING_KEY": secrets.token_hex(32),
        "WEED_JWT_SIGNING_READ_KEY": secrets.token_hex(32),
        "WEED_JWT_FILER_SIGNING_KEY": secrets.token_hex(32),
        "WEED_JWT_FILER_SIGNING_READ_KEY": secrets.token_hex(32),
        "WEED_ACCESS_UI": "false",  # the volume server's status page
        "WEED_FILER_EXPOSE_DIRECTORY_METADATA_ENABLED": "false",
        "WEED_GRPC_CA": str(ca),
    }
    for role in GRPC_ROLES:
        env[f"WEED_GRPC_{role.upper()}_CERT"] = str(cert)
        env[f"WEED_GRPC_{role.upper()}_KEY"] = str(key)
    return env


def write_stack_certificates(tls_dir: Path) -> tuple[Path, Path, Path]:
    """A fresh certificate authority and one certificate it signs (for 127.0.0.1 and localhost,
    server and client use); returns the paths of the CA certificate, the certificate and its key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    day = datetime.timedelta(days=1)
    valid = {"not_valid_before": now - day, "not_valid_after": now + 3650 * day}
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "free local stack CA")])
    ca = (
        x509.CertificateBuilder(subject_name=ca_name, issuer_name=ca_name, public_key=ca_key.public_key(),
                                serial_number=x509.random_serial_number(), **valid)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    cert = (
        x509.CertificateBuilder(subject_name=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "free-stack")]),
                                issuer_name=ca_name, public_key=key.public_key(),
                                serial_number=x509.random_serial_number(), **valid)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    tls_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    tls_dir.chmod(0o700)
    paths = tls_dir / "ca.crt", tls_dir / "stack.crt", tls_dir / "stack.key"
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    for path, data in zip(paths, (ca.public_bytes(pem), cert.public_bytes(pem), key_pem), strict=True):
        write_private(path, data)
    return paths


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, owner-only (0600) from the first byte."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

"""TLS certificates and SuperNode authentication keys for a secured Flower 1.42 deployment.

Written with the ``cryptography`` package (no ``openssl`` binary needed), in the formats the
Flower 1.42 binaries read:

- ``ca.crt`` / ``ca.key`` — a private certificate authority (EC P-384, self-signed,
  ``basicConstraints CA:TRUE, pathlen:0``, ``keyUsage keyCertSign, cRLSign``).
  ``ca.crt`` is what SuperNodes (``--root-certificates``) and the ``flwr`` CLI
  (``root-certificates`` in ``config.toml``) trust; ``ca.key`` is only needed to issue new
  certificates and belongs offline.
- ``superlink.crt`` / ``superlink.key`` — the SuperLink's server certificate (EC P-384,
  signed by the CA, ``extendedKeyUsage serverAuth``) for ``--ssl-certfile`` /
  ``--ssl-keyfile``. Its subjectAltName lists every given host (IP addresses as IP
  entries, everything else as DNS names) plus ``localhost``, ``127.0.0.1`` and ``::1``:
  the SuperLink's own SuperExec connects to it over loopback with TLS (a bind-all
  ``--host 0.0.0.0`` is dialled as ``127.0.0.1``), so without them a TLS SuperLink cannot
  run its own ServerApps.
- ``supernode-<i>.key`` / ``supernode-<i>.pub`` — SuperNode authentication key pairs:
  ECDSA on NIST P-384, private key in OpenSSH format (``flower-supernode
  --auth-supernode-private-key`` loads it with ``load_ssh_private_key``), public key as an
  OpenSSH line (``flwr supernode register`` loads it with ``load_ssh_public_key`` and
  accepts only NIST curves) — the same as ``ssh-keygen -t ecdsa -b 384 -N ""``.

Private keys are unencrypted (the services start unattended) and created with mode 0600;
a newly created output directory gets mode 0700.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import re
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "CertificateBundle",
    "NodeKeyPair",
    "add_certs_command",
    "describe",
    "generate_certificates",
]

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
SUPERLINK_PORT = 8000  # Flower 1.42 default --port: Fleet, Control and Runtime API over HTTPS

_CURVE = ec.SECP384R1
_HASH = hashes.SHA384
_CLOCK_SKEW = dt.timedelta(minutes=5)  # certificates start slightly in the past
_DNS_NAME = re.compile(r"^(\*\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
                       r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")


@dataclass(frozen=True)
class NodeKeyPair:
    """One SuperNode's authentication keys (OpenSSH formats)."""

    name: str
    private_key: Path
    public_key: Path


@dataclass(frozen=True)
class CertificateBundle:
    """Paths of everything :func:`generate_certificates` wrote.

    Attributes
    ----------
    directory : Path
        The output directory.
    ca_certificate, ca_key : Path
        CA certificate (distribute) and CA private key (keep offline).
    server_certificate, server_key : Path
        SuperLink certificate and private key.
    nodes : tuple[NodeKeyPair, ...]
        SuperNode authentication key pairs, ``supernode-1`` ... ``supernode-N``.
    hosts : tuple[str, ...]
        Host names and addresses in the SuperLink certificate's subjectAltName.
    """

    directory: Path
    ca_certificate: Path
    ca_key: Path
    server_certificate: Path
    server_key: Path
    nodes: tuple[NodeKeyPair, ...]
    hosts: tuple[str, ...]


def generate_certificates(
    out_dir: Path,
    hosts: Sequence[str],
    *,
    num_nodes: int = 0,
    days: int = 365,
    overwrite: bool = False,
) -> CertificateBundle:
    """Create a CA, a SuperLink certificate for ``hosts`` and ``num_nodes`` SuperNode keys.

    Parameters
    ----------
    out_dir : Path
        Directory for the files (created with mode 0700 if missing).
    hosts : Sequence[str]
        DNS names and/or IP addresses SuperNodes and the ``flwr`` CLI use to reach the
        SuperLink (no scheme, no port). Loopback names are always added.
    num_nodes : int
        Number of SuperNode authentication key pairs to create.
    days : int
        Validity of both certificates, in days.
    overwrite : bool
        Replace existing files. Without it nothing is written if any target file exists.

    Raises
    ------
    ValueError
        For a host that is neither an IP address nor a DNS name, ``days < 1`` or
        ``num_nodes < 0``.
    FileExistsError
        If a target file exists and ``overwrite`` is false.
    """
    if days < 1:
        raise ValueError(f"days must be >= 1; got {days}")
    if num_nodes < 0:
        raise ValueError(f"num_nodes must be >= 0; got {num_nodes}")
    san_hosts = tuple(dict.fromkeys([*(h.strip() for h in hosts), *LOOPBACK_HOSTS]))
    san = x509.SubjectAlternativeName([_general_name(host) for host in san_hosts])

    out_dir = Path(out_dir).expanduser()
    bundle = CertificateBundle(
        directory=out_dir,
        ca_certificate=out_dir / "ca.crt",
        ca_key=out_dir / "ca.key",
        server_certificate=out_dir / "superlink.crt",
        server_key=out_dir / "superlink.key",
        nodes=tuple(
            NodeKeyPair(f"supernode-{i}", out_dir / f"supernode-{i}.key",
                        out_dir / f"supernode-{i}.pub")
            for i in range(1, num_nodes + 1)
        ),
        hosts=san_hosts,
    )
    targets = [bundle.ca_certificate, bundle.ca_key, bundle.server_certificate, bundle.server_key]
    targets += [path for node in bundle.nodes for path in (node.private_key, node.public_key)]
    existing = [path.name for path in targets if path.exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{out_dir} already holds {', '.join(existing)}; pass overwrite=True "
            "(pollen certs --overwrite) to replace them"
        )
    if not out_dir.exists():
        out_dir.mkdir(mode=0o700, parents=True)

    now = dt.datetime.now(dt.UTC)
    not_before, not_after = now - _CLOCK_SKEW, now + dt.timedelta(days=days)
    ca_key = ec.generate_private_key(_CURVE())
    ca_name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Pollen"),
        x509.NameAttribute(NameOID.COMMON_NAME, f"Pollen Flower CA {uuid.uuid4().hex[:8]}"),
    ])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, _HASH())
    )

    server_key = ec.generate_private_key(_CURVE())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Pollen"),
            x509.NameAttribute(NameOID.COMMON_NAME, "Pollen SuperLink"),
        ]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(san, critical=False)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, _HASH())
    )

    _write(bundle.ca_key, _pem_private_key(ca_key), 0o600, overwrite)
    _write(bundle.ca_certificate, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644,
           overwrite)
    _write(bundle.server_key, _pem_private_key(server_key), 0o600, overwrite)
    _write(bundle.server_certificate, server_cert.public_bytes(serialization.Encoding.PEM),
           0o644, overwrite)
    for node in bundle.nodes:
        node_key = ec.generate_private_key(_CURVE())
        private = node_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
        public = node_key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        _write(node.private_key, private, 0o600, overwrite)
        _write(node.public_key, public + f" {node.name}\n".encode(), 0o644, overwrite)
    return bundle


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if len(host) > 253 or not _DNS_NAME.match(host):
        raise ValueError(
            f"hosts: {host!r} is neither an IP address nor a DNS name; give the name or "
            "address only, without scheme or port (e.g. 'superlink.example.org', '10.0.0.5')"
        )
    return x509.DNSName(host.lower())


def _key_usage(
    *, digital_signature: bool = False, key_cert_sign: bool = False, crl_sign: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _pem_private_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes, mode: int, overwrite: bool) -> None:
    """Write ``data`` to a file that has ``mode`` from its first byte on.

    The file is created with ``os.open(..., mode)`` — never world-readable for a moment.
    Without ``overwrite`` it is created exclusively (``O_EXCL``); with it, a temporary
    file is written and renamed over the old one, which also drops the old file's mode.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    target = path if not overwrite else path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    fd = os.open(target, flags, mode)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        if overwrite:
            os.replace(target, path)
    except BaseException:
        target.unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------
# `pollen certs`


def add_certs_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``pollen certs`` to the ``pollen`` CLI's subparsers and return its parser."""
    parser = subparsers.add_parser(
        "certs",
        help="create TLS certificates and SuperNode keys for a secured deployment",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument(
        "--host", action="append", required=True, dest="hosts", metavar="NAME_OR_IP",
        help="DNS name or IP address of the SuperLink (repeat for several); "
        "localhost, 127.0.0.1 and ::1 are always included",
    )
    parser.add_argument("--nodes", type=int, default=0, help="SuperNode key pairs to create")
    parser.add_argument("--days", type=int, default=365, help="certificate validity in days")
    parser.add_argument("--overwrite", action="store_true", help="replace existing files")
    parser.set_defaults(func=_cmd_certs)
    return parser


def _cmd_certs(args: argparse.Namespace) -> int:
    try:
        bundle = generate_certificates(
            args.out, args.hosts, num_nodes=args.nodes, days=args.days, overwrite=args.overwrite
        )
    except ValueError as err:
        print(f"pollen: error: {err}", file=sys.stderr)
        return 2
    except FileExistsError as err:
        print(f"pollen: error: {err}", file=sys.stderr)
        return 1
    print(describe(bundle))
    return 0


def describe(bundle: CertificateBundle) -> str:
    """What was written and the Flower 1.42 commands that use it."""
    d = bundle.directory.resolve()
    host = bundle.hosts[0]
    address = f"[{host}]:{SUPERLINK_PORT}" if ":" in host else f"{host}:{SUPERLINK_PORT}"
    lines = [
        f"Wrote to {d}:",
        f"  {bundle.ca_certificate.name:<16} CA certificate: give it to SuperNodes and flwr CLI",
        f"  {bundle.ca_key.name:<16} CA private key (0600): keep it offline",
        f"  {bundle.server_certificate.name:<16} SuperLink certificate for "
        + ", ".join(bundle.hosts),
        f"  {bundle.server_key.name:<16} SuperLink private key (0600)",
    ]
    lines += [
        f"  {node.private_key.name:<16} {node.name} private key (0600), public key "
        f"{node.public_key.name}"
        for node in bundle.nodes
    ]
    lines += [
        "",
        "Start the SuperLink (Fleet, Control and Runtime API on one HTTPS port):",
        (
            f"  flower-superlink --ssl-ca-certfile {d / 'ca.crt'} "
            f"--ssl-certfile {d / 'superlink.crt'} --ssl-keyfile {d / 'superlink.key'} "
            f"--enable-supernode-auth --host 0.0.0.0 --port {SUPERLINK_PORT}"
        ),
        "Add a connection to $FLWR_HOME/config.toml (default ~/.flwr/config.toml):",
        "  [superlink.pollen-tls]",
        f'  address = "{address}"',
        f'  root-certificates = "{d / "ca.crt"}"',
    ]
    if bundle.nodes:
        lines.append("Register each SuperNode's public key, then start it with its private key:")
        for i, node in enumerate(bundle.nodes):
            lines += [
                f"  flwr supernode register {d / node.public_key.name} pollen-tls",
                (
                    f"  flower-supernode --superlink {address} "
                    f"--root-certificates {d / 'ca.crt'} "
                    f"--auth-supernode-private-key {d / node.private_key.name} "
                    f'--node-config "partition-id={i} data-path=/path/to/local-data.npz '
                    f'state-dir=/var/lib/pollen"'
                ),
            ]
    lines.append("Run an app:  flwr run . pollen-tls --stream")
    return "\n".join(lines)

"""Tests for fedserver.certs: chain and SANs, file modes, Flower's key loaders, real TLS."""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError
from flwr.cli.supernode.register import try_load_public_key
from flwr.supercore.primitives.asymmetric import (
    public_key_to_bytes,
    sign_message,
    verify_signature,
)
from flwr.supernode.cli.flower_supernode import _try_setup_client_authentication

from fedserver.certs import LOOPBACK_HOSTS, add_certs_command, generate_certificates

HOSTS = ["superlink.example.org", "10.0.0.5", "fe80::1"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return generate_certificates(tmp_path_factory.mktemp("certs") / "out", HOSTS, num_nodes=2)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _subject(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def test_server_certificate_chains_to_the_ca_for_every_host(bundle):
    ca, leaf = _cert(bundle.ca_certificate), _cert(bundle.server_certificate)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = {str(n) for n in san.get_values_for_type(x509.DNSName)}
    names |= {str(n) for n in san.get_values_for_type(x509.IPAddress)}
    assert names == {
        "superlink.example.org", "10.0.0.5", "fe80::1", "localhost", "127.0.0.1", "::1"
    }
    days = (leaf.not_valid_after_utc - leaf.not_valid_before_utc).days
    assert 365 <= days <= 366

    store = Store([ca])
    for host in [*HOSTS, *LOOPBACK_HOSTS]:
        verifier = PolicyBuilder().store(store).build_server_verifier(_subject(host))
        chain = verifier.verify(leaf, [])
        assert chain[-1] == ca
    with pytest.raises(VerificationError):
        PolicyBuilder().store(store).build_server_verifier(
            x509.DNSName("other.example.org")
        ).verify(leaf, [])
    expired = PolicyBuilder().store(store).time(dt.datetime.now(dt.UTC) + dt.timedelta(days=400))
    with pytest.raises(VerificationError):
        expired.build_server_verifier(x509.DNSName("localhost")).verify(leaf, [])


def test_private_keys_are_0600_even_with_a_permissive_umask(tmp_path):
    old = os.umask(0)
    try:
        b = generate_certificates(tmp_path / "out", ["localhost"], num_nodes=1)
    finally:
        os.umask(old)
    assert _mode(b.directory) == 0o700
    for key in (b.ca_key, b.server_key, b.nodes[0].private_key):
        assert _mode(key) == 0o600, key
    for public in (b.ca_certificate, b.server_certificate, b.nodes[0].public_key):
        assert _mode(public) == 0o644, public


def test_node_keys_are_accepted_by_flowers_own_loaders(bundle):
    for node in bundle.nodes:
        registered = try_load_public_key(node.public_key)  # `flwr supernode register`
        private, public = _try_setup_client_authentication(  # `flower-supernode`
            argparse.Namespace(
                auth_supernode_private_key=str(node.private_key), auth_supernode_public_key=None
            )
        )
        assert public_key_to_bytes(public) == registered
        assert private.curve.name == "secp384r1"
        signature = sign_message(private, b"pollen")
        assert verify_signature(public, b"pollen", signature)
    first, second = (try_load_public_key(n.public_key) for n in bundle.nodes)
    assert first != second


def test_existing_files_are_kept_unless_overwrite(tmp_path):
    out = tmp_path / "out"
    first = generate_certificates(out, ["localhost"], num_nodes=1)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(FileExistsError, match="overwrite"):
        generate_certificates(out, ["localhost"], num_nodes=1)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    first.ca_key.chmod(0o644)  # a loosened mode must not survive an overwrite
    second = generate_certificates(out, ["localhost"], num_nodes=1, overwrite=True)
    assert second.ca_certificate.read_bytes() != before["ca.crt"]
    assert _mode(second.ca_key) == 0o600
    assert sorted(p.name for p in out.iterdir()) == sorted(before)  # no temporary files left


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"hosts": ["https://superlink.example.org:8000"]}, "hosts"),
        ({"hosts": [""]}, "hosts"),
        ({"hosts": ["localhost"], "days": 0}, "days"),
        ({"hosts": ["localhost"], "num_nodes": -1}, "num_nodes"),
    ],
)
def test_invalid_arguments_are_rejected_before_writing(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate_certificates(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def _handshake(bundle, client_ca: Path, server_hostname: str) -> None:
    """TLS handshake over a socket pair: SuperLink cert on one end, a client on the other."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(bundle.server_certificate, bundle.server_key)
    client_ctx = ssl.create_default_context(cafile=str(client_ca))
    server_sock, client_sock = socket.socketpair()
    server_errors = []

    def serve() -> None:
        try:
            with server_ctx.wrap_socket(server_sock, server_side=True) as tls:
                tls.sendall(tls.recv(5))
        except (ssl.SSLError, OSError) as err:
            server_errors.append(err)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with client_ctx.wrap_socket(client_sock, server_hostname=server_hostname) as tls:
            tls.sendall(b"hello")
            assert tls.recv(5) == b"hello"
    finally:
        client_sock.close()
        thread.join(timeout=10)
    assert server_errors == []


@pytest.mark.parametrize("hostname", ["superlink.example.org", "10.0.0.5", "localhost"])
def test_tls_handshake_succeeds_for_clients_trusting_the_ca(bundle, hostname):
    _handshake(bundle, bundle.ca_certificate, hostname)


def test_tls_handshake_fails_for_another_ca_or_another_name(bundle, tmp_path):
    other = generate_certificates(tmp_path / "other", HOSTS)
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
        _handshake(bundle, other.ca_certificate, "superlink.example.org")
    with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
        _handshake(bundle, bundle.ca_certificate, "elsewhere.example.org")


def test_pollen_certs_command(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="pollen")
    add_certs_command(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "deploy"
    argv = ["certs", "--out", str(out), "--host", "10.0.0.5", "--host", "fl.example.org",
            "--nodes", "2", "--days", "30"]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert f"--ssl-certfile {out / 'superlink.crt'}" in printed
    assert "--enable-supernode-auth" in printed
    assert f"flwr supernode register {out / 'supernode-2.pub'}" in printed
    assert f"--auth-supernode-private-key {out / 'supernode-2.key'}" in printed
    assert 'address = "10.0.0.5:8000"' in printed
    leaf = _cert(out / "superlink.crt")
    assert (leaf.not_valid_after_utc - leaf.not_valid_before_utc).days == 30

    args = parser.parse_args(argv)
    assert args.func(args) == 1
    assert "--overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["certs", "--out", str(out)])  # --host is required

"""The Ray token over TLS: an `https://` dashboard gets it only inside a verified TLS session, an `http://` one
off this machine is named in a warning. A real TLS server on loopback with a private CA made here."""

from __future__ import annotations

import datetime
import ipaddress
import json
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from controller.apply.dashboard import DashboardClient, DashboardError, cleartext_warning


def _certificate(subject: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[str, ec.EllipticCurvePrivateKey] | None,
                 ca: bool) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    issuer_name, signer = issuer or (subject, key)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=1)).not_valid_after(now + datetime.timedelta(hours=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                        critical=False)
    return builder.sign(signer, hashes.SHA256())


def _pem(path: Path, *objects: x509.Certificate | ec.EllipticCurvePrivateKey) -> Path:
    parts = [o.public_bytes(serialization.Encoding.PEM) if isinstance(o, x509.Certificate) else
             o.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
             for o in objects]
    path.write_bytes(b"".join(parts))
    return path


@pytest.fixture
def tls_dashboard(tmp_path: Path) -> Iterator[tuple[str, Path, list[dict[str, str]]]]:
    """(https URL, CA bundle, headers of every request received) of a TLS server answering like Ray's /api/version."""
    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("diffops test CA", ca_key, None, ca=True)
    leaf = _certificate("ray-dashboard", leaf_key, ("diffops test CA", ca_key), ca=False)
    seen: list[dict[str, str]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            seen.append(dict(self.headers))
            body = json.dumps({"version": "test", "ray_version": "2.60"}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(_pem(tmp_path / "leaf.pem", leaf, leaf_key))
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{server.server_address[1]}", _pem(tmp_path / "ca.pem", ca), seen
    server.shutdown()
    server.server_close()


def test_an_https_dashboard_gets_the_token_inside_tls_when_its_certificate_verifies(tls_dashboard, monkeypatch):
    url, ca_bundle, seen = tls_dashboard
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_bundle))
    dashboard = DashboardClient(url, "s3cret")
    assert dashboard.alive()
    assert [h.get("Authorization") for h in seen] == ["Bearer s3cret"]  # the server only speaks TLS
    assert cleartext_warning(url, "s3cret") is None


def test_an_untrusted_certificate_sends_nothing_and_says_how_to_trust_it(tls_dashboard, monkeypatch):
    url, _, seen = tls_dashboard
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    with pytest.raises(DashboardError) as refused:
        DashboardClient(url, "s3cret").request("GET", "/api/version")
    assert "TLS certificate does not verify" in str(refused.value) and "SSL_CERT_FILE" in str(refused.value)
    assert seen == []  # no request, so no token, reached the server


@pytest.mark.parametrize("url, token, warned", [
    ("http://10.0.3.7:8265", "t", True),
    ("http://ray-head.ml.svc:8265", "t", True),
    ("http://127.0.0.1:8265", "t", False),
    ("http://localhost:8265", "t", False),
    ("http://[::1]:8265", "t", False),
    ("https://ray-head.ml.svc", "t", False),
    ("http://10.0.3.7:8265", None, False),
])
def test_a_token_sent_in_clear_text_off_this_machine_is_warned_about(url, token, warned):
    warning = cleartext_warning(url, token)
    assert (warning is not None) == warned
    if warned:
        assert "unencrypted" in warning and "https://" in warning

"""Public keys from files: a PEM public key or an X.509 certificate, as identity providers hand
them out, checked before any token is verified with them (RSA below 2048 bits is refused)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from joserfc.jwk import ECKey, Key, OKPKey, RSAKey

__all__ = ["load_public_key"]


def load_public_key(path: Path) -> Key:
    """Read a PEM public key or X.509 certificate (Auth0 hands out certificates)."""
    try:
        pem = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read the JWT public key {str(path)!r}: {exc}") from None
    try:
        if b"BEGIN CERTIFICATE" in pem:
            public: Any = x509.load_pem_x509_certificate(pem).public_key()
        else:
            public = serialization.load_pem_public_key(pem)
    except ValueError:
        raise ValueError(f"{str(path)!r} is not a PEM public key or certificate") from None
    clean = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if isinstance(public, rsa.RSAPublicKey):
        if public.key_size < 2048:
            raise ValueError(f"{str(path)!r}: RSA keys below 2048 bits are refused")
        return RSAKey.import_key(clean)
    if isinstance(public, ec.EllipticCurvePublicKey):
        return ECKey.import_key(clean)
    if isinstance(public, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return OKPKey.import_key(clean)
    raise ValueError(f"{str(path)!r}: unsupported key type {type(public).__name__}")

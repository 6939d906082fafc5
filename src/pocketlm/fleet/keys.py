"""Ed25519 signing keys (through `cryptography`) and the package encryption key.

    pocketlm keygen -o release          # release.key (private, mode 600) and release.pub
    sign(private_key, data) / verify(public_key_path, data, signature)

The encryption key (AES-256-GCM) comes from a file (32 raw bytes, or 64 hex characters) or from the
environment variable POCKETLM_PACKAGE_KEY (hex); it is never written into a package.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import ConfigError, DataError, IntegrityError
from ..io import atomic_write_path

KEY_ENV = "POCKETLM_PACKAGE_KEY"


def generate(out: str | Path, overwrite: bool = False) -> tuple[Path, Path]:
    """Write OUT.key (PKCS#8 PEM, owner-only) and OUT.pub (SubjectPublicKeyInfo PEM)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    out = Path(out)
    priv_path, pub_path = out.with_name(out.name + ".key"), out.with_name(out.name + ".pub")
    for p in (priv_path, pub_path):
        if p.exists() and not overwrite:
            raise ConfigError(f"key file '{p}' already exists", "choose another name or pass --overwrite")
    key = Ed25519PrivateKey.generate()
    with atomic_write_path(priv_path) as tmp:
        tmp.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
        os.chmod(tmp, 0o600)
    with atomic_write_path(pub_path) as tmp:
        tmp.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                      serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv_path, pub_path


def _read(path: str | Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError:
        raise DataError(f"{what} '{path}' cannot be read", "pass an existing key file (pocketlm keygen makes one)") from None


def load_private(path: str | Path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    try:
        key = serialization.load_pem_private_key(_read(path, "signing key"), password=None)
    except (ValueError, TypeError):
        raise DataError(f"'{path}' is not an unencrypted PEM private key", "pass the .key file from pocketlm keygen") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise DataError(f"'{path}' is not an Ed25519 key", "make one with pocketlm keygen")
    return key


def load_public(path: str | Path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    try:
        key = serialization.load_pem_public_key(_read(path, "trusted public key"))
    except (ValueError, TypeError):
        raise DataError(f"'{path}' is not a PEM public key", "pass the .pub file from pocketlm keygen") from None
    if not isinstance(key, Ed25519PublicKey):
        raise DataError(f"'{path}' is not an Ed25519 public key", "pass the .pub file from pocketlm keygen")
    return key


def public_pem(private_key) -> bytes:
    from cryptography.hazmat.primitives import serialization
    return private_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                 serialization.PublicFormat.SubjectPublicKeyInfo)


def sign(private_key, data: bytes) -> bytes:
    return private_key.sign(data)


def verify(public_key, data: bytes, signature: bytes, what: str) -> None:
    from cryptography.exceptions import InvalidSignature
    try:
        public_key.verify(signature, data)
    except InvalidSignature:
        raise IntegrityError(f"the signature of {what} does not verify with the trusted key",
                             "the package was modified or signed by another key; get a genuine one") from None


def encryption_key(path: str | Path | None) -> bytes | None:
    """The AES-256 key from `path`, else from $POCKETLM_PACKAGE_KEY (hex), else None."""
    if path is not None:
        raw = _read(path, "encryption key")
        if len(raw) == 32:  # raw bytes (not stripped: any byte may be whitespace)
            return raw
        text = raw.decode(errors="replace").strip()
    elif os.environ.get(KEY_ENV):
        text = os.environ[KEY_ENV].strip()
    else:
        return None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise ConfigError("the encryption key is not 32 bytes (or 64 hex characters)",
                          f"write one with: python -c \"import os; print(os.urandom(32).hex())\" > key, or set {KEY_ENV}")
    return key

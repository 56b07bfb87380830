"""Signed ledger heads: the coordinator signs (sequence number, head hash, time); anyone verifies.

A signed head is an anchor: a ledger that verifies must still hold the event it names, with that
hash. The coordinator keeps every head it signs in an append-only file and hands them to its
sites, which keep the newest; the JSON form below is both a line of that file and a site's
exported anchor file. The signature is ECDSA (P-256, SHA-256) with the key of the
coordinator's mTLS certificate, over the sha256 of the head's canonical JSON.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from protocols.pki import Role
from protocols.signing import SignatureError, sign_digest, verify_signed_digest
from protocols.v1 import baton_pb2 as pb

__all__ = ["HeadError", "SignedHead", "sign_head"]

_FORMAT = "baton-ledger-head/1"


class HeadError(ValueError):
    """A signed head that cannot be read, or whose signature or signer does not verify."""


@dataclass(frozen=True)
class SignedHead:
    """The coordinator's signed statement that its ledger held event `seq` with hash `hash`."""

    seq: int
    hash: str
    signed_at: str  # ISO-8601 UTC, as signed
    signature: bytes
    certificate_pem: bytes  # the signer's (coordinator's) certificate

    def digest(self) -> str:
        """The sha256 (hex) that is signed: of the canonical JSON of (format, seq, hash, time)."""
        body = json.dumps(
            {"format": _FORMAT, "seq": self.seq, "hash": self.hash, "signed_at": self.signed_at},
            sort_keys=True,
            separators=(",", ":"),
        )
        return hashlib.sha256(body.encode("ascii")).hexdigest()

    def describe(self) -> str:
        return f"signed head #{self.seq} (hash {self.hash[:12]}..., signed {self.signed_at})"

    def verify(self, ca_pem: bytes) -> None:
        """Checks the signature and that the signer is a coordinator certified by the CA.

        Raises:
            HeadError: If it does not verify.
        """
        try:
            at = datetime.fromisoformat(self.signed_at.replace("Z", "+00:00"))
            if at.tzinfo is None:
                raise ValueError("no time zone")
        except ValueError as exc:
            raise HeadError(f"{self.describe()}: unreadable signing time: {exc}") from exc
        try:
            verify_signed_digest(
                self.digest(),
                self.signature,
                self.certificate_pem,
                ca_pem=ca_pem,
                role=Role.COORDINATOR,
                at=at,
                what="ledger head",
            )
        except SignatureError as exc:
            raise HeadError(f"{self.describe()}: {exc}") from exc

    def to_json(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "seq": self.seq,
            "hash": self.hash,
            "signed_at": self.signed_at,
            "signature": self.signature.hex(),
            "certificate": self.certificate_pem.decode("ascii"),
        }

    @classmethod
    def from_json(cls, data: object) -> SignedHead:
        """Reads the JSON form.

        Raises:
            HeadError: If it is not a signed head of this format.
        """
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise HeadError(f"not a signed ledger head (expected format {_FORMAT!r})")
        try:
            seq, digest = data["seq"], data["hash"]
            if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
                raise ValueError(f"seq must be a positive integer, not {seq!r}")
            if not isinstance(digest, str) or len(digest) != 64:
                raise ValueError("hash must be 64 hex digits")
            return cls(
                seq=seq,
                hash=digest,
                signed_at=str(data["signed_at"]),
                signature=bytes.fromhex(str(data["signature"])),
                certificate_pem=str(data["certificate"]).encode("ascii"),
            )
        except (KeyError, ValueError, UnicodeEncodeError) as exc:
            raise HeadError(f"not a readable signed ledger head: {exc}") from exc

    def to_proto(self) -> pb.SignedLedgerHead:
        return pb.SignedLedgerHead(
            seq=self.seq,
            hash=self.hash,
            signed_at=self.signed_at,
            signature=self.signature,
            certificate_pem=self.certificate_pem,
        )

    @classmethod
    def from_proto(cls, message: pb.SignedLedgerHead) -> SignedHead:
        return cls.from_json(
            {
                "format": _FORMAT,
                "seq": message.seq,
                "hash": message.hash,
                "signed_at": message.signed_at,
                "signature": message.signature.hex(),
                "certificate": message.certificate_pem.decode("ascii", "replace"),
            }
        )


def sign_head(
    seq: int, head_hash: str, *, private_key_pem: bytes, certificate_pem: bytes
) -> SignedHead:
    """Signs the ledger's event `seq` with hash `head_hash`, now, with the coordinator's key."""
    signed_at = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    unsigned = SignedHead(seq, head_hash, signed_at, b"", certificate_pem)
    return SignedHead(
        seq, head_hash, signed_at, sign_digest(private_key_pem, unsigned.digest()), certificate_pem
    )

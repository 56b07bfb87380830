"""The wire contract both ends share: protobuf stubs, mTLS/PKI helpers, checkpoint bundle format."""

from protocols.checkpoint import Bundle, CheckpointError, CheckpointManifest, inspect_bundle
from protocols.pki import PeerIdentity, PkiError, Role, identity_from_pem
from protocols.transport import TlsFiles

__all__ = [
    "Bundle",
    "CheckpointError",
    "CheckpointManifest",
    "PeerIdentity",
    "PkiError",
    "Role",
    "TlsFiles",
    "identity_from_pem",
    "inspect_bundle",
]

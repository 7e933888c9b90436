"""The server's settings: one frozen dataclass, layered like the client's
(defaults, JSON file, ``ENFPIRE_*`` variables, command-line flags)."""
from __future__ import annotations

from dataclasses import dataclass

from edge_client.config import load_config

__all__ = ["ServerConfig", "load_config"]


@dataclass(frozen=True)
class ServerConfig:
    """Everything an operator can set."""

    index: str = ""                  # index directory (required to serve)
    host: str = "127.0.0.1"          # loopback unless told otherwise
    port: int = 8080
    threads: int = 4                 # waitress worker threads
    backend: str = "numpy"           # nearest-neighbour backend: numpy | sklearn | faiss | faiss-ivf
    max_batch: int = 32              # concurrent queries scored in one pass; 1 = no batching
    max_k: int = 64                  # most candidate spots one request may ask for
    max_body: int = 64 * 1024        # bytes; larger requests get 413
    features_per_spot: int = 8       # representative features (k-means centres) returned per candidate
    feature_dtype: str = "float16"   # wire encoding of candidate features when codec_dim is 0
    codec_dim: int = 128             # codec dimensions of candidate features (int8 codes); 0 = full float16
    # Bits a candidate's look is coded in: 4 (the wire's int4: codes of the row's Hadamard rotation, half
    # the bytes of int8 at the same rerank ceiling, docs/privacy.md#4-bit-looks) or 8 (int8 codes).
    # 4 needs a power-of-two codec_dim. The public document's looks stay int8 either way.
    look_bits: int = 4
    # The codec basis, learnt from the gallery: "learned-whitening" (its spot labels whiten the space the
    # phone compares in: the user's top-1 passes the raw feature's) or "pca" (the uncentred PCA of its
    # features); docs/privacy.md#the-codec-space.
    codec_kind: str = "learned-whitening"
    prototypes_per_spot: int = 3     # public per-spot prototypes the phone chooses cells with
    # Every public cell holds at least this many spots. 16 where 4-bit looks leave the bytes for it (the
    # aware attacker falls from 0.25x to 0.16x of the baseline on wa-landmarks' tuning split, ~42 KiB a query).
    cell_min_spots: int = 16
    # Seed of the derivation's k-means (looks, prototypes, cells). Any seed is as good as another;
    # researchers vary it to measure how much a figure owes to the starts (tools.evaluate --structure-seeds).
    structure_seed: int = 0
    # Bytes of per-spot int8 rows in the public document (GET /v1/public): what fits is published
    # whole (the real datasets), beyond it the looks go and then prototypes, never below one a spot.
    # 1.3 MB keeps the gzipped document under 2 MB at 10,000 spots (docs/benchmarks.md).
    public_budget: int = 1_300_000
    max_pending: int = 64            # requests queued beyond this get 503 + Retry-After
    queue_timeout: float = 8.0       # seconds a queued request waits for a slot, then 503 (under the phone's 10 s read timeout)
    retry_after: int = 1             # seconds a refused client is told to wait (Retry-After)
    admin_token: str = ""            # the admin API is off unless this is set (16+ characters)
    admin_host: str = "127.0.0.1"    # the admin API listens here, never on the lookup port
    admin_port: int = 8081
    model: str = ""                  # extractor for admin spot additions; "" = the prepared model
    ohttp_keys: str = ""             # OHTTP gateway key file; "" = <index>/ohttp-keys.json, "off" = no gateway
    ohttp_grace: float = 7 * 86400.0  # seconds a rotated-out key still decrypts
    ohttp_rotate_days: float = 0.0   # rotate the key when it is this old; 0 = only `enfpire-server ohttp rotate`
    log_peers: bool = False          # log each request's peer address (demos, audits); off keeps the logs clean

"""What masking costs a site: keystream generators, and ``secagg.mask`` at 3 and 20 sites.

``python benchmarks/mask_cost.py``: CPU seconds, best of 7, on this machine.

- Keystream throughput of the generators ``cryptography`` offers (GB/s, 256 KB updates):
  ChaCha20 (fed_de's masks until secagg v1) and AES-CTR (v2: AES-128-CTR).
- ``secagg.mask`` of one message (5,000 genes x 40 floats, three-word encoding) by one site
  of a 3- and a 20-site study (2 and 8 mask neighbours): ms, and ns per value and neighbour;
  ``FixedPoint.encode`` alone; and the aggregator's ``unmask_sum`` over every site.
"""

from __future__ import annotations

import json
import os

import numpy as np
from cpu_clock import best_cpu  # benchmarks/ is sys.path[0]
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from fed_de import secagg


def keystream_gbps(make, total: int = 32 << 20, piece: int = 256 << 10) -> float:
    """GB/s of keystream from a fresh encryptor per call, ``piece`` bytes per update."""
    zeros, out = bytes(piece), bytearray(piece)

    def run():
        enc = make().encryptor()
        for _ in range(total // piece):
            enc.update_into(zeros, out)

    return total / best_cpu(run, repeats=7) / 1e9


def sessions(n_sites: int) -> list[secagg.SecAggSession]:
    """Every site's session of one run."""
    pairs = {f"site{i:02d}": secagg.new_keypair() for i in range(n_sites)}
    public = {name: p.public for name, p in pairs.items()}
    return [secagg.open_session(p.private, public, name, b"bench")
            for name, p in pairs.items()]


def mask_cost(n_sites: int, genes: int = 5000, width: int = 40) -> dict:
    """One message masked by one site, encoded alone, and summed by the aggregator."""
    rng = np.random.default_rng(0)
    msg = {"x": rng.normal(size=(genes, width)) * 1e6}
    sess = sessions(n_sites)
    tags = iter(range(1, 10**6))
    masked = [secagg.mask(msg, s, 0) for s in sess]
    mid = sess[n_sites // 2]  # neighbours on both sides
    seconds = best_cpu(lambda: secagg.mask(msg, mid, next(tags)), repeats=7)
    encode = best_cpu(lambda: secagg.FixedPoint().encode(msg["x"], n_sites), repeats=7)
    unmask = best_cpu(lambda: secagg.unmask_sum(masked), repeats=3)
    values, peers = genes * width, len(mid.seeds)
    return {"sites": n_sites, "neighbours": peers, "mask_ms": round(1e3 * seconds, 1),
            "ns_per_value_per_neighbour": round(1e9 * (seconds - encode) / values / peers, 2),
            "encode_ns_per_value": round(1e9 * encode / values, 2),
            "unmask_all_sites_ms": round(1e3 * unmask, 1)}


def main() -> dict:
    key32, key16 = os.urandom(32), os.urandom(16)
    out = {"keystream_GB_per_s": {
        "ChaCha20": round(keystream_gbps(
            lambda: Cipher(algorithms.ChaCha20(key32, bytes(16)), mode=None)), 2),
        "AES-128-CTR": round(keystream_gbps(
            lambda: Cipher(algorithms.AES(key16), modes.CTR(bytes(16)))), 2),
        "AES-256-CTR": round(keystream_gbps(
            lambda: Cipher(algorithms.AES(key32), modes.CTR(bytes(16)))), 2)},
        "mask": [mask_cost(3), mask_cost(20)]}
    return out


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))

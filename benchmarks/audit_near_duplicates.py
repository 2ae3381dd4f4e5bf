"""Near-duplicate search in the leakage audit: bit-band buckets against all-pairs, side by side in one run.

    python benchmarks/audit_near_duplicates.py [--samples 20000] [--planted 200]

Prints both timings, their ratio, and checks that both find exactly the same pairs (the bucket search is
exact for Hamming <= 4 with 5 bands, by the pigeonhole principle).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from modality.commands.audit import near_duplicate_pairs
from modality.training.hardware import cpu_banner


def all_pairs(hashes: np.ndarray, max_hamming: int, chunk: int = 2048) -> list[tuple[int, int, int]]:
    """Reference: every pair's popcount, in row chunks to bound memory."""
    found = []
    for start in range(0, len(hashes), chunk):
        rows = hashes[start : start + chunk]
        dist = np.bitwise_count(rows[:, None] ^ hashes[None, :])
        for r, c in zip(*np.nonzero(dist <= max_hamming), strict=True):
            i, j = start + int(r), int(c)
            if i < j:
                found.append((i, j, int(dist[r, c])))
    return sorted(found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--planted", type=int, default=200)
    args = parser.parse_args()
    print(cpu_banner())
    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 2**63, size=args.samples, dtype=np.int64).astype(np.uint64)
    variants = hashes[: args.planted].copy()
    for k in range(args.planted):
        for bit in rng.choice(64, size=1 + k % 6, replace=False):
            variants[k] ^= np.uint64(1) << np.uint64(int(bit))
    values = np.concatenate([hashes, variants])

    t0 = time.perf_counter()
    banded = near_duplicate_pairs(values.tolist(), 4)
    t_banded = time.perf_counter() - t0
    t0 = time.perf_counter()
    reference = all_pairs(values, 4)
    t_all = time.perf_counter() - t0
    print(f"{len(values)} hashes, {len(reference)} pairs within 4 bits")
    print(
        f"bit-band buckets: {t_banded:.3f} s   all pairs: {t_all:.3f} s   ratio all/banded: {t_all / t_banded:.1f}x"
    )
    print("same pairs:", banded == reference)


if __name__ == "__main__":
    main()

"""What checking the download's hashes costs: CPU MiB/s of sha256 / git sha1 and of transfer's write path.

``python benchmarks/hash_overhead.py [--mib 512]`` prints CPU-time rates (best of 3, so other load on the
machine counts little): ``hashlib`` on 1 MiB blocks, and ``transfer._write_all`` writing 64 KiB pieces (as a
socket hands them over) into a temporary file with and without the streaming sha256, plus the CPU
seconds these rates mean for the 18,239,794,688-byte demo checkpoint. Run it with
``OPENSSL_ia32cap=":~0x20000000"`` to see a CPU without the SHA extensions. See docs/download.md.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
from collections.abc import Callable

from colab_helpers.weights.content_hash import ContentHash
from colab_helpers.weights.transfer import _write_all

MIB = 1 << 20
PIECE = 64 * 1024
CHECKPOINT_BYTES = 18_239_794_688  # the demo repo's shards and files


def best_rate(run: Callable[[], None], mib: int) -> float:
    """MiB per CPU second, best of 3."""
    best = 0.0
    for _ in range(3):
        start = time.process_time()
        run()
        best = max(best, mib / max(time.process_time() - start, 1e-9))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=512, help="MiB hashed / written per measurement")
    mib = parser.parse_args().mib
    block = os.urandom(MIB)

    def hashing(name: str) -> Callable[[], None]:
        def run() -> None:
            h = hashlib.new(name)
            for _ in range(mib):
                h.update(block)
            h.hexdigest()

        return run

    def writing(etag: str | None) -> Callable[[], None]:
        def run() -> None:
            digest = ContentHash(etag, mib * MIB)
            with tempfile.TemporaryDirectory() as folder, open(os.path.join(folder, "f"), "wb", buffering=0) as f:
                for _ in range(mib):
                    for i in range(0, MIB, PIECE):
                        _write_all(f, block[i : i + PIECE], lambda n: None, digest)
            digest.matches()

        return run

    sha256, sha1 = best_rate(hashing("sha256"), mib), best_rate(hashing("sha1"), mib)
    plain, hashed = best_rate(writing(None), mib), best_rate(writing("0" * 64), mib)
    total = CHECKPOINT_BYTES / MIB
    print(f"sha256 {sha256:.0f} MiB/s, git sha1 {sha1:.0f} MiB/s (CPU time, 1 MiB blocks)")
    print(f"write path (64 KiB pieces): {plain:.0f} MiB/s without the hash, {hashed:.0f} MiB/s with sha256")
    print(
        f"{CHECKPOINT_BYTES:,} B = {total:.0f} MiB: sha256 {total / sha256:.1f} CPU s; "
        f"write path +{total / hashed - total / plain:.1f} CPU s"
    )


if __name__ == "__main__":
    main()

"""Checkpoints, packed small enough to travel to a lent GPU machine, and unpacked there.

The device tool sends at most 64 MiB of working tree per call, and a 1-layer run's checkpoint
(weights and both Adam moments, float32) is 5.1 MB: 16 of them do not fit beside MNIST. Plain
xz saves 13 % of a checkpoint; splitting each float's four bytes into four planes first (the
exponent bytes repeat, the low mantissa bytes do not) saves 20 %. Unpacking checks every file
against the SHA-256 of its original, so a run resumes from exactly the bytes committed here.

    here:   python bench/gpu_ckpt.py pack .gpu/ckpt results/variants-s4/runs/RUN ...
    device: python bench/gpu_ckpt.py unpack .gpu/ckpt      (bench/gpu.sh does this)
"""

import argparse
import hashlib
import lzma
import sys
from pathlib import Path

import numpy as np

CHECKPOINT = "checkpoint.safetensors"
MANIFEST = "manifest.tsv"  # one line per checkpoint: packed name, SHA-256, path from the repo root


def shuffle(data: bytes) -> bytes:
    """The bytes of ``data`` (zero-padded to a multiple of 4) as four planes: every 4th byte."""
    padded = data + b"\0" * (-len(data) % 4)
    return np.frombuffer(padded, np.uint8).reshape(-1, 4).T.tobytes()


def unshuffle(planes: bytes, size: int) -> bytes:
    """Inverse of :func:`shuffle`: the first ``size`` bytes of the interleaved planes."""
    return np.frombuffer(planes, np.uint8).reshape(4, -1).T.tobytes()[:size]


def pack(dest: Path, run_dirs: list[Path]) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, run in enumerate(run_dirs):
        data = (run / CHECKPOINT).read_bytes()
        name = f"{i:03d}.xz"
        (dest / name).write_bytes(
            len(data).to_bytes(8, "little") + lzma.compress(shuffle(data), preset=9)
        )
        lines.append(f"{name}\t{hashlib.sha256(data).hexdigest()}\t{run / CHECKPOINT}")
        print(
            f"{run}: {len(data) / 1e6:.2f} MB -> {(dest / name).stat().st_size / 1e6:.2f} MB",
            flush=True,
        )
    (dest / MANIFEST).write_text("\n".join(lines) + "\n")


def unpack(source: Path) -> None:
    for line in (source / MANIFEST).read_text().splitlines():
        name, digest, target = line.split("\t")
        raw = (source / name).read_bytes()
        data = unshuffle(lzma.decompress(raw[8:]), int.from_bytes(raw[:8], "little"))
        if hashlib.sha256(data).hexdigest() != digest:
            sys.exit(
                f"{source / name}: unpacked bytes differ from the checkpoint packed ({target})"
            )
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        Path(target).write_bytes(data)
        print(f"unpacked {target}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="pack the checkpoints of RUN_DIRs into DEST")
    p.add_argument("dest", type=Path)
    p.add_argument("run_dirs", type=Path, nargs="+")
    u = sub.add_parser("unpack", help="write the checkpoints packed in SOURCE back to their paths")
    u.add_argument("source", type=Path)
    args = parser.parse_args()
    if args.command == "pack":
        pack(args.dest, args.run_dirs)
    else:
        unpack(args.source)


if __name__ == "__main__":
    main()

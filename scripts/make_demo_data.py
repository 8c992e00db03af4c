"""Build the HH-RLHF sample that ships inside the package (`src/peft_panacea/demo_data/`).

Takes a seeded, content-based selection of raw rows from the helpful-base and harmless-base test splits of
Anthropic's HH-RLHF (MIT), keeps every selected line byte for byte, and writes it as gzipped JSON lines in the
folder layout `read_hh_rlhf` reads, with the data's licence and a provenance file beside it. Reruns give
byte-identical files (gzip header without name or time).

Usage, from the repository root, with `../shared/data/hh-rlhf` beside the repository:

    python scripts/make_demo_data.py
    python scripts/make_demo_data.py --rows 600 --seed 0 --source ../shared/data/hh-rlhf
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import sys
from pathlib import Path

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = REPOSITORY_ROOT.parent / "shared" / "data" / "hh-rlhf"
DEFAULT_OUTPUT = REPOSITORY_ROOT / "src" / "peft_panacea" / "demo_data"
SPLIT_FILE = "test.jsonl.gz"
GZIP_LEVEL = 9

# Where each source file comes from; the sha256 is checked before anything is written.
SOURCES = {
    "helpful-base": {
        "sha256": "8be3fc1a13b27901631696f2be6f184c799f1baeaf145f53ac5db24960adc37b",
        "origin": (
            "github.com/DaehanKim/EasyRLHF, commit `45eccb72ddb8c18aa52dc2a184516380e06582fe`, path "
            "`data/helpful-base/test.jsonl.gz`. Its sha256 equals the Git-LFS oid of `helpful-base/test.jsonl.gz` in "
            "github.com/anthropics/hh-rlhf (commit `354e5c3cb8960630860dd5774a6ac2a58313bf4d`), so the bytes are "
            "Anthropic's."
        ),
    },
    "harmless-base": {
        "sha256": "ebfaaed21162a4de120ae85366075b34425e2a6303fac59b99555002f7016f03",
        "origin": (
            "github.com/anthropics/hh-rlhf, commit `354e5c3cb8960630860dd5774a6ac2a58313bf4d`, path "
            "`harmless-base/test.jsonl.gz` (byte-identical)."
        ),
    },
}


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def select_lines(lines: list[bytes], rows: int, seed: int) -> list[bytes]:
    """The `rows` lines with the smallest `sha256(f"{seed}:" + line)`, in their original file order."""
    ranked = sorted(range(len(lines)), key=lambda index: sha256_of(f"{seed}:".encode() + lines[index]))
    return [lines[index] for index in sorted(ranked[:rows])]


def deterministic_gzip(data: bytes) -> bytes:
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, compresslevel=GZIP_LEVEL, mtime=0) as archive:
        archive.write(data)
    return buffer.getvalue()


def provenance(rows: int, seed: int, written: dict[str, tuple[int, int, str, str]], licence_sha: str) -> str:
    lines = [
        "# Provenance of the embedded HH-RLHF sample",
        "",
        "A small sample of Anthropic's HH-RLHF test splits (Bai et al. 2022, \"Training a Helpful and Harmless "
        'Assistant with Reinforcement Learning from Human Feedback", arXiv:2204.05862), shipped so that a fresh '
        "install runs its demo offline. **Content warning:** harmless-base holds red-team prompts and harmful "
        "replies, meant for research on making models less harmful.",
        "",
        f"Licence: MIT, Copyright (c) 2022 Anthropic; the full text is in `LICENSE` (sha256 `{licence_sha}`), "
        "copied unchanged from github.com/anthropics/hh-rlhf. It covers this data, not the package's code.",
        "",
        "## Files",
        "",
        "| file | rows | of | sha256 |",
        "|---|---|---|---|",
    ]
    for subset, (kept, total, digest, _) in written.items():
        lines.append(f"| `{subset}/{SPLIT_FILE}` | {kept} | {total} | `{digest}` |")

    lines += ["", "## Sources", ""]
    for subset, (_, _, _, source_digest) in written.items():
        lines.append(f"* `{subset}/{SPLIT_FILE}` (source sha256 `{source_digest}`): {SOURCES[subset]['origin']}")

    lines += [
        "",
        "## Selection",
        "",
        f'From each source file, the {rows} lines with the smallest `sha256(b"{seed}:" + line)` (the raw line '
        "bytes, without the newline), written in their original order. Every line is byte-identical to a line of "
        'the source: the original `{"chosen": ..., "rejected": ...}` format, unchanged. A few selected pairs may '
        "be ones that `read_hh_rlhf` drops (for example an empty reply); it warns with the count.",
        "",
        "Made by (from the repository root, with `../shared/data/hh-rlhf` beside the repository):",
        "",
        "```",
        f"python scripts/make_demo_data.py --rows {rows} --seed {seed}",
        "```",
        "",
        "The gzip files carry no name and a zero time in their header, so reruns are byte-identical.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="the hh-rlhf folder (LICENSE, raw/)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="the package's demo_data folder")
    parser.add_argument("--rows", type=int, default=600, help="rows taken from each subset")
    parser.add_argument("--seed", type=int, default=0, help="seed of the selection")
    args = parser.parse_args(argv)

    written = {}
    for subset, source in SOURCES.items():
        compressed = (args.source / "raw" / subset / SPLIT_FILE).read_bytes()
        if sha256_of(compressed) != source["sha256"]:
            parser.error(f"{subset}: sha256 {sha256_of(compressed)} differs from the expected {source['sha256']}")
        lines = [line for line in gzip.decompress(compressed).split(b"\n") if line.strip()]
        if args.rows > len(lines):
            parser.error(f"--rows {args.rows} is more than the {len(lines)} rows of {subset}")

        selected = select_lines(lines, args.rows, args.seed)
        data = deterministic_gzip(b"".join(line + b"\n" for line in selected))
        target = args.output / subset / SPLIT_FILE
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        written[subset] = (len(selected), len(lines), sha256_of(data), source["sha256"])

    licence = (args.source / "LICENSE").read_bytes()
    (args.output / "LICENSE").write_bytes(licence)
    (args.output / "PROVENANCE.md").write_text(provenance(args.rows, args.seed, written, sha256_of(licence)))

    for subset, (kept, total, digest, _) in written.items():
        print(f"{subset}: {kept} of {total} rows, sha256 {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

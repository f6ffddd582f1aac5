"""A held-out text set from what a Debian machine has: package descriptions as binary
bags of words, labelled by package section (like the paper's IMDB bag of the top 1K
words). Reads apt's package lists (no download) and writes a ``file:`` source:

    python experiments/heldout/debian_packages.py --out data/debian_bow.npz
    metalearn eval pretrained:laptop --dataset file:data/debian_bow.npz

x: [N, vocab] float32 in {0, 1} (word present in the package's description); y: [N]
section index; the ``classes`` most common sections, at most ``per_class`` packages each
(the first in apt's order). Needs ``lz4cat`` for apt's compressed lists.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import subprocess

import numpy as np

WORD = re.compile(r"[a-z][a-z0-9+\-]{2,}")


def read_packages(pattern: str) -> list[tuple[str, str]]:
    """(section, description) of every package stanza in apt's ``*_Packages*`` lists."""
    paths = sorted(glob.glob(pattern))
    if not paths:
        raise SystemExit(f"no apt package lists match {pattern}; run `apt-get update` or "
                         f"pass --lists")
    out = []
    for path in paths:
        cmd = ["lz4cat", path] if path.endswith(".lz4") else ["cat", path]
        text = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        for stanza in text.split("\n\n"):
            section, desc = None, []
            in_desc = False
            for line in stanza.splitlines():
                if line.startswith("Section:"):
                    section = line.split(":", 1)[1].strip().split("/")[-1]
                    in_desc = False
                elif line.startswith("Description:"):
                    desc.append(line.split(":", 1)[1])
                    in_desc = True
                elif in_desc and line.startswith(" "):
                    desc.append(line)
                else:
                    in_desc = False
            if section and desc:
                out.append((section, " ".join(desc).lower()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output .npz")
    parser.add_argument("--lists", default="/var/lib/apt/lists/*_Packages*",
                        help="glob of apt package lists")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--per-class", type=int, default=2000)
    parser.add_argument("--vocab", type=int, default=1000)
    args = parser.parse_args()
    packages = read_packages(args.lists)
    sections = [s for s, _ in collections.Counter(s for s, _ in packages).most_common(
        args.classes)]
    kept: dict[str, list[str]] = {s: [] for s in sections}
    for section, desc in packages:
        if section in kept and len(kept[section]) < args.per_class:
            kept[section].append(desc)
    counts = collections.Counter(w for descs in kept.values() for d in descs
                                 for w in set(WORD.findall(d)))
    vocab = {w: i for i, (w, _) in enumerate(counts.most_common(args.vocab))}
    rows, labels = [], []
    for label, section in enumerate(sections):
        for desc in kept[section]:
            row = np.zeros(len(vocab), np.float32)
            row[[vocab[w] for w in set(WORD.findall(desc)) if w in vocab]] = 1.0
            rows.append(row)
            labels.append(label)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    np.savez_compressed(args.out, x=np.stack(rows), y=np.asarray(labels, np.int64))
    print(f"wrote {args.out}: {len(rows)} packages, {len(sections)} sections "
          f"({', '.join(f'{s} {len(kept[s])}' for s in sections)}), vocabulary {len(vocab)}")


if __name__ == "__main__":
    main()

"""Two sets of outside text, ~4,096 SmolLM2 tokens each, that neither the default corpus nor
parent-written text contain: the check of a family's GENERAL quality.

- ``fortunes.txt`` — general English far from the corpus: prose from Debian's ``fortunes``
  package (``apt-get install fortunes``), pieces of at least 300 characters from its prose
  categories, de-duplicated, shuffled with seed 0.
- ``manpages.txt`` — software documentation near the corpus's genre but not in it: the man pages
  of common command-line tools (``man``/``col`` from the system), paragraphs of at least 200
  characters that do not mention Python.

    python benchmarks/outside_text.py OUT_DIR
    plrd eval FAMILY --eval-data OUT_DIR/fortunes.txt     # general ppl and KL on each set

Deterministic for a given set of installed packages.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import subprocess
from pathlib import Path

from plrd.io.models import load_tokenizer

TARGET_TOKENS = 4096 + 64
FORTUNES = Path("/usr/share/games/fortunes")
FORTUNE_CATEGORIES = (
    "literature wisdom people love men-women humorists food education law medicine news "
    "politics science work kids pets miscellaneous fortunes platitudes sports drugs magic tao "
    "riddles"
).split()
MAN_PAGES = (
    "ls cp find grep tar sed chmod rsync ssh curl gzip sort du df ps kill xargs diff patch make "
    "git bash top mount ln dd wget less cron crontab systemctl journalctl apt-get dpkg ip "
    "iptables useradd passwd su sudo tee wc head tail uniq cut tr date env nice nohup watch zip "
    "unzip scp gpg openssl awk install stat touch mkdir rm"
).split()


def fortune_pieces() -> list[str]:
    if not FORTUNES.is_dir():
        raise SystemExit(f"{FORTUNES} not found: apt-get install fortunes")
    pieces = set()
    for category in FORTUNE_CATEGORIES:
        path = FORTUNES / category
        if not path.is_file():
            continue
        for piece in path.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
            text = "\n".join(line.strip() for line in piece.strip("\n%").splitlines()).strip()
            if len(text) >= 300 and "http" not in text:
                pieces.add(text)
    return sorted(pieces)


def man_pieces() -> list[str]:
    env = dict(os.environ, MANWIDTH="80", MAN_KEEP_FORMATTING="0")
    pieces = set()
    for page in MAN_PAGES:
        rendered = subprocess.run(
            ["man", "--nh", "--nj", "-P", "cat", page], capture_output=True, text=True, env=env
        )
        if rendered.returncode != 0 or not rendered.stdout.strip():
            continue
        plain = subprocess.run(
            ["col", "-bx"], input=rendered.stdout, capture_output=True, text=True
        ).stdout
        lines = [line.strip() for line in plain.splitlines()][1:-1]  # header and footer
        for para in re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).split("\n\n"):
            if len(para) >= 200 and "python" not in para.lower():
                pieces.add(para)
    return sorted(pieces)


def take(pieces: list[str], tokenizer, path: Path) -> None:
    """Shuffle (seed 0) and join pieces until they hold ``TARGET_TOKENS`` tokens."""
    random.Random(0).shuffle(pieces)
    chosen, tokens = [], 0
    for piece in pieces:
        chosen.append(piece)
        tokens += len(tokenizer(piece + "\n\n", add_special_tokens=False)["input_ids"])
        if tokens >= TARGET_TOKENS:
            break
    path.write_text("\n\n".join(chosen) + "\n")
    print(f"{path}: {len(chosen)} pieces, about {tokens:,} tokens")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer("smollm2-135m")
    take(fortune_pieces(), tokenizer, args.out / "fortunes.txt")
    take(man_pieces(), tokenizer, args.out / "manpages.txt")


if __name__ == "__main__":
    main()

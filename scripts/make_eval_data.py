"""Build the offline lm-eval task data in evaluate/tasks/data/ (run by `make eval-data`).

- heldout.jsonl: English paragraphs from docstrings of Python standard-library modules that
  data/sample.txt does NOT use (so they are held out from the training sample).
- lastword.jsonl: LAMBADA-style items from those paragraphs: a passage ending a sentence, minus
  its last word (context), and that word (target).
- dictionary.jsonl: WordNet 3.0 (Debian package `wordnet-base`) definitions with the right
  headword among 4 choices; distractors are headwords of the same part of speech.

Deterministic for one Python version and WordNet release (fixed seed). Run:
    apt-get install wordnet-base && python scripts/make_eval_data.py
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import random
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "evaluate" / "tasks" / "data"
WORDNET = Path("/usr/share/wordnet")
SEED = 1234
MIN_WORDS = 25

# Disjoint from scripts/make_sample_text.py's MODULES: held-out text for the same domain.
HELDOUT_MODULES = [
    "ast", "binascii", "bz2", "cmd", "code", "codecs", "codeop", "colorsys", "compileall", "contextvars",
    "copyreg", "dis", "doctest", "filecmp", "fileinput", "fnmatch", "ftplib", "getopt", "getpass",
    "graphlib", "linecache", "locale", "lzma", "modulefinder", "netrc", "pdb", "pkgutil", "platform",
    "plistlib", "poplib", "pstats", "py_compile", "pyclbr", "pydoc", "quopri", "reprlib", "rlcompleter",
    "runpy", "signal", "site", "socketserver", "ssl", "stat", "stringprep", "symtable", "sysconfig",
    "tabnanny", "tomllib", "tracemalloc", "urllib.request", "urllib.robotparser", "uu", "webbrowser",
    "wsgiref.simple_server", "xml.sax", "xmlrpc.client", "zipapp", "zipimport", "zlib",
]
_LAST_WORD = re.compile(r"^(.*\S)\s+([A-Za-z]{3,})\.$")


def heldout_paragraphs() -> list[str]:
    """Unique docstring paragraphs of at least MIN_WORDS words, in module order."""
    seen, out = set(), []
    for name in HELDOUT_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        members = [module] + [obj for _, obj in sorted(vars(module).items())
                              if (inspect.isclass(obj) or inspect.isfunction(obj))
                              and getattr(obj, "__module__", None) == name]
        for obj in members:
            for block in (inspect.getdoc(obj) or "").split("\n\n"):
                text = " ".join(block.split())
                if (len(text.split()) >= MIN_WORDS and not text.startswith((">>>", "...", "-", "*"))
                        and text not in seen):
                    seen.add(text)
                    out.append(text)
    return out


def last_word_items(paragraphs: list[str], limit: int) -> list[dict]:
    """Passages that end a sentence with a plain word: context = all but that word, target = the word."""
    items = []
    for text in paragraphs:
        sentences = re.split(r"(?<=\.)\s+", text)
        passage = ""
        for sentence in sentences:
            passage = f"{passage} {sentence}".strip()
            match = _LAST_WORD.match(passage)
            if match and len(passage.split()) >= 20:
                items.append({"context": match.group(1), "target": match.group(2)})
                break
    random.Random(SEED).shuffle(items)
    return items[:limit]


def wordnet_entries(pos_files=("noun", "verb", "adj", "adv")) -> dict[str, list[tuple[str, str]]]:
    """{part of speech: [(headword, definition)]} for single-word lowercase headwords."""
    if not (WORDNET / "data.noun").is_file():
        sys.exit(f"WordNet not found in {WORDNET}: install it with `apt-get install wordnet-base`")
    entries: dict[str, list[tuple[str, str]]] = {}
    for pos in pos_files:
        rows = []
        for line in (WORDNET / f"data.{pos}").read_text(encoding="latin-1").splitlines():
            if line.startswith("  ") or "|" not in line:
                continue
            fields, gloss = line.split("|", 1)
            parts = fields.split()
            word = re.sub(r"\(.*\)$", "", parts[4])
            definition = gloss.split(";")[0].strip()
            if (word.isalpha() and word.islower() and len(word) >= 4 and len(definition.split()) >= 4
                    and word not in definition.lower()):
                rows.append((word, definition))
        entries[pos] = rows
    return entries


def dictionary_items(entries: dict[str, list[tuple[str, str]]], limit: int) -> list[dict]:
    """Definition -> the right headword among 4 (3 distractors of the same part of speech)."""
    rng = random.Random(SEED)
    items = []
    pools = {pos: sorted({word for word, _ in rows}) for pos, rows in entries.items()}
    per_pos = {"noun": limit // 2, "verb": limit // 4, "adj": limit // 8, "adv": limit - limit // 2 - limit // 4 - limit // 8}
    for pos, count in per_pos.items():
        for word, definition in rng.sample(entries[pos], count):
            distractors = []
            while len(distractors) < 3:
                other = rng.choice(pools[pos])
                if other != word and other not in distractors and other not in definition.lower():
                    distractors.append(other)
            choices = distractors + [word]
            rng.shuffle(choices)
            items.append({"definition": definition, "pos": pos, "choices": choices, "label": choices.index(word)})
    rng.shuffle(items)
    return items


def write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    tmp.replace(path)
    print(f"wrote {path.relative_to(REPO)}: {len(rows)} items")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--heldout", type=int, default=300, help="held-out paragraphs (default 300)")
    parser.add_argument("--items", type=int, default=300, help="items per task (default 300)")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    paragraphs = heldout_paragraphs()
    write_jsonl(OUT / "heldout.jsonl", [{"text": text} for text in paragraphs[: args.heldout]])
    write_jsonl(OUT / "lastword.jsonl", last_word_items(paragraphs, args.items))
    write_jsonl(OUT / "dictionary.jsonl", dictionary_items(wordnet_entries(), args.items))


if __name__ == "__main__":
    main()

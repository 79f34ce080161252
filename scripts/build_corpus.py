"""Build an offline English training corpus with a held-out split, reproducibly (fixed seed).

Sources are Debian packages (install first: `apt-get install -y python3-doc linux-doc-6.1`):
- python3-doc: the Python documentation (HTML pages -> paragraphs of prose);
- linux-doc-6.1: the Linux kernel documentation (reStructuredText -> paragraphs, code blocks dropped);
- with `--with-more-docs`: three more sources of technical prose, about 1.8M words (+62%):
  - manpages, manpages-dev: the Linux man-pages project's pages, rendered with `man`
    (descriptions and notes; synopses, examples and code dropped);
  - postgresql-doc-15: the PostgreSQL manual (HTML, as python3-doc);
  - git-doc: Git's manual pages and guides (HTML);
- with `--with-gcide` (needs dict-gcide): the GNU Collaborative International Dictionary of English.
  Off by default: relufy's offline dictionary task is built from WordNet definitions, and training
  on another dictionary would leak into it.

Documents (a page section, or a run of dictionary entries) that share a run of 8 words with any text of
relufy's offline lm-eval tasks (evaluate/tasks/data/*.jsonl) are dropped: python3-doc's library reference
repeats many of the stdlib docstrings those tasks are built from, and a model trained on them would be
scored on memorised passages. The rest are shuffled with `--seed` and split by document, so held-out text
is never trained on. Writes OUT/train.txt.gz, OUT/heldout.txt and
OUT/manifest.json (counts and sha256 of each output).

    python scripts/build_corpus.py --out runs/corpus [--heldout-fraction 0.01] [--seed 0] [--with-more-docs]
                                   [--decontaminate-ngram 8]   # 0 keeps every document (the corpus of older runs)
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import random
import os
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from html.parser import HTMLParser
from pathlib import Path

PYTHON_DOCS = Path("/usr/share/doc/python3-doc/html")
LINUX_DOCS = Path("/usr/share/doc/linux-doc-6.1/Documentation")
GCIDE = Path("/usr/share/dictd/gcide.dict.dz")
MANPAGES = Path("/usr/share/doc/manpages")  # the packages' marker; the pages come from `dpkg -L`
POSTGRESQL_DOCS = Path("/usr/share/doc/postgresql-doc-15/html")
GIT_DOCS = Path("/usr/share/doc/git-doc")
MANPAGE_PACKAGES = ("manpages", "manpages-dev")
EVAL_DATA = Path(__file__).resolve().parents[1] / "evaluate" / "tasks" / "data"
DECONTAMINATE_NGRAM = 8  # with 10 or 13 (GPT-3's choice) 2-3 last-word endings stayed in the training text
DOC_CHARS = 3000  # documents are cut to about this many characters
ENTRIES_PER_DOC = 12


class _ProseExtractor(HTMLParser):
    """Collects the text of <p>, <dd> and <li> elements, skipping code and navigation."""

    KEEP, SKIP = {"p", "dd", "li"}, {"pre", "script", "style", "nav", "code", "table"}

    def __init__(self) -> None:
        super().__init__()
        self.paragraphs: list[str] = []
        self._depth_keep = self._depth_skip = 0
        self._buffer: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self._depth_skip += 1
        elif tag in self.KEEP:
            self._depth_keep += 1

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self._depth_skip = max(0, self._depth_skip - 1)
        elif tag in self.KEEP:
            self._depth_keep = max(0, self._depth_keep - 1)
            if self._depth_keep == 0:
                text = " ".join("".join(self._buffer).split())
                if len(text.split()) >= 12:
                    self.paragraphs.append(text)
                self._buffer = []

    def handle_data(self, data):
        if self._depth_keep and not self._depth_skip:
            self._buffer.append(data)


def html_documents(root: Path) -> list[str]:
    documents = []
    for page in sorted(root.rglob("*.html")):
        if any(part in {"_static", "genindex", "search"} for part in page.parts):
            continue
        parser = _ProseExtractor()
        parser.feed(page.read_text(errors="replace"))
        documents.extend(_chunk(parser.paragraphs))
    return documents


_PRONUNCIATION = re.compile(r"\\[^\\\n]*\\\s*(\([^)]*\))?")
_MARKUP = re.compile(r"\[(?:1913 Webster|Webster 1913 Suppl\.|PJC|WordNet 1\.5|Century Dict\.)[^\]]*\]|[{}]")


def gcide_documents() -> list[str]:
    raw = gzip.decompress(GCIDE.read_bytes()).decode("utf-8", errors="replace")
    entries = []
    for block in raw.split("\n\n"):
        text = _MARKUP.sub("", _PRONUNCIATION.sub("", block, count=1))
        text = " ".join(text.split())
        if len(text.split()) >= 8 and not text.startswith("00-database"):
            entries.append(text)
    return ["\n".join(entries[i: i + ENTRIES_PER_DOC]) for i in range(0, len(entries), ENTRIES_PER_DOC)]


_RST_NOISE = re.compile(r"^(\.\. |:[a-zA-Z]+:|[=\-~^*#+`]{4,}$|\|)")


def linux_doc_documents() -> list[str]:
    documents = []
    for page in sorted(LINUX_DOCS.rglob("*.rst.gz")):
        paragraphs = []
        for block in gzip.decompress(page.read_bytes()).decode("utf-8", errors="replace").split("\n\n"):
            lines = [line for line in block.splitlines() if line.strip()]
            if not lines or lines[0].startswith((" ", "\t")) or _RST_NOISE.match(lines[0]):
                continue  # indented code/literal blocks, directives, tables, title underlines
            text = " ".join(" ".join(lines).split()).replace("``", "")
            if len(text.split()) >= 12:
                paragraphs.append(text)
        documents.extend(_chunk(paragraphs))
    return documents


_MAN_CODE_SECTIONS = {"SYNOPSIS", "EXAMPLES", "EXAMPLE", "SEE ALSO", "COLOPHON", "VERSIONS", "STANDARDS", "HISTORY",
                      "ATTRIBUTES", "LIBRARY"}


def manpage_documents() -> list[str]:
    listed = subprocess.run(["dpkg", "-L", *MANPAGE_PACKAGES], capture_output=True, text=True)
    if listed.returncode != 0:
        raise SystemExit(f"{' and '.join(MANPAGE_PACKAGES)} are not both installed; run: "
                         f"apt-get install -y {' '.join(MANPAGE_PACKAGES)}")
    pages = sorted(path for path in listed.stdout.splitlines() if re.search(r"/man/man\d/[^/]+\.gz$", path))
    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:
        return [document for paragraphs in pool.map(_manpage_paragraphs, pages) for document in _chunk(paragraphs)]


def _manpage_paragraphs(page: str) -> list[str]:
    """Prose paragraphs of one rendered man page: indented blocks of >= 12 words outside code sections."""
    rendered = subprocess.run(["man", "-E", "UTF-8", "-l", page], capture_output=True, text=True,
                              env={**os.environ, "MANWIDTH": "10000", "MAN_KEEP_FORMATTING": ""}).stdout
    rendered = re.sub(r".\x08", "", rendered)  # overstrike bold/underline
    paragraphs, section = [], ""
    for block in re.split(r"\n\s*\n", rendered):
        lines = [line for line in block.splitlines() if line.strip()]
        if lines and not lines[0].startswith(" "):  # a section heading (its first paragraph may follow)
            section, lines = lines[0].strip(), lines[1:]
        if not lines or section in _MAN_CODE_SECTIONS or len(lines[0]) - len(lines[0].lstrip()) > 14:
            continue  # code and deeper-indented literal blocks
        text = " ".join(" ".join(lines).split())
        if len(text.split()) >= 12 and not re.search(r"[{};]\s*$|#include", text):
            paragraphs.append(text)
    return paragraphs


def _chunk(paragraphs: list[str]) -> list[str]:
    documents, current = [], []
    for paragraph in paragraphs:
        current.append(paragraph)
        if sum(map(len, current)) >= DOC_CHARS:
            documents.append("\n".join(current))
            current = []
    if current:
        documents.append("\n".join(current))
    return documents


_WORD = re.compile(r"[a-z0-9]+")


def word_ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    """Runs of n lower-cased words (letters and digits; punctuation and markup ignored)."""
    words = _WORD.findall(text.lower())
    return {tuple(words[i: i + n]) for i in range(len(words) - n + 1)}


def eval_texts(folder: Path = EVAL_DATA) -> list[str]:
    """The passages of the offline lm-eval tasks: a last-word item is its context followed by its target."""
    texts = []
    for path in sorted(folder.glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            if {"context", "target"} <= record.keys():
                texts.append(f"{record['context']} {record['target']}")
            else:
                texts.extend(value for value in record.values() if isinstance(value, str))
    return texts


def decontaminate(documents: list[str], texts: list[str], n: int) -> list[str]:
    """The documents that share no run of n words with any of `texts`."""
    banned = set().union(*(word_ngrams(text, n) for text in texts))
    return [document for document in documents if banned.isdisjoint(word_ngrams(document, n))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--heldout-fraction", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--with-more-docs", action="store_true",
                        help="add man-pages, the PostgreSQL manual and Git's documentation (see above)")
    parser.add_argument("--with-gcide", action="store_true", help="add the GCIDE dictionary (see above)")
    parser.add_argument("--decontaminate-ngram", type=int, default=DECONTAMINATE_NGRAM, metavar="N",
                        help="drop documents sharing N words in a row with the lm-eval task data (0: keep all)")
    args = parser.parse_args()
    sources = {"python3-doc": (PYTHON_DOCS, lambda: html_documents(PYTHON_DOCS)),
               "linux-doc-6.1": (LINUX_DOCS, linux_doc_documents)}
    if args.with_more_docs:
        sources["manpages manpages-dev"] = (MANPAGES, manpage_documents)
        sources["postgresql-doc-15"] = (POSTGRESQL_DOCS, lambda: html_documents(POSTGRESQL_DOCS))
        sources["git-doc"] = (GIT_DOCS, lambda: html_documents(GIT_DOCS))
    if args.with_gcide:
        sources["dict-gcide"] = (GCIDE, gcide_documents)
    for package, (path, _) in sources.items():
        if not path.exists():
            raise SystemExit(f"{path} is missing; run: apt-get install -y {package}")
    if args.out.exists():
        raise SystemExit(f"{args.out} exists; remove it or choose another --out")

    documents = sorted({document for _, read in sources.values() for document in read()})
    found = len(documents)
    if args.decontaminate_ngram > 0:
        documents = decontaminate(documents, eval_texts(), args.decontaminate_ngram)
    random.Random(args.seed).shuffle(documents)
    cut = max(1, int(len(documents) * args.heldout_fraction))
    heldout, train = documents[:cut], documents[cut:]

    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.mkdir(parents=True)
    train_text = ("\n\n".join(train) + "\n").encode("utf-8")  # mtime=0: the same bytes on every build
    (tmp / "train.txt.gz").write_bytes(gzip.compress(train_text, compresslevel=6, mtime=0))
    (tmp / "heldout.txt").write_text("\n\n".join(heldout) + "\n", encoding="utf-8")
    manifest = {
        "sources": {package: str(path) for package, (path, _) in sources.items()},
        "seed": args.seed, "heldout_fraction": args.heldout_fraction,
        "decontamination": None if args.decontaminate_ngram <= 0 else {
            "ngram": args.decontaminate_ngram, "documents_dropped": found - len(documents),
            "against": {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(EVAL_DATA.glob("*.jsonl"))}},
        "documents": {"train": len(train), "heldout": len(heldout)},
        "words": {"train": sum(len(d.split()) for d in train), "heldout": sum(len(d.split()) for d in heldout)},
        "sha256": {name: hashlib.sha256((tmp / name).read_bytes()).hexdigest()
                   for name in ("train.txt.gz", "heldout.txt")},
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    tmp.rename(args.out)
    print(json.dumps(manifest, indent=2))


if __name__ == "__main__":
    main()

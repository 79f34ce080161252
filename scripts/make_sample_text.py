"""Build data/sample.txt: English prose from the Python standard library's docstrings.

Offline and deterministic for one Python version; used by the quickstart and the tests.
Run: python scripts/make_sample_text.py
"""

import importlib
import inspect
import textwrap
from pathlib import Path

MODULES = [
    "argparse", "asyncio", "base64", "bisect", "calendar", "collections", "concurrent.futures", "configparser",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email", "enum", "fractions",
    "functools", "gettext", "glob", "gzip", "hashlib", "heapq", "hmac", "html", "http.client", "imaplib",
    "inspect", "io", "ipaddress", "itertools", "json", "logging", "mailbox", "mimetypes", "multiprocessing",
    "numbers", "operator", "optparse", "os", "pathlib", "pickle", "pprint", "queue", "random", "re", "sched",
    "secrets", "selectors", "shelve", "shlex", "shutil", "smtplib", "socket", "sqlite3", "statistics", "string",
    "struct", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize", "trace",
    "traceback", "types", "typing", "unittest", "urllib.parse", "uuid", "warnings", "wave", "weakref",
    "xml.dom.minidom", "zipfile", "zoneinfo",
]
MIN_WORDS = 25


def paragraphs():
    for name in MODULES:
        module = importlib.import_module(name)
        members = [module] + [obj for _, obj in sorted(vars(module).items())
                              if (inspect.isclass(obj) or inspect.isfunction(obj)) and getattr(obj, "__module__", None) == name]
        for obj in members:
            for block in (inspect.getdoc(obj) or "").split("\n\n"):
                text = " ".join(block.split())
                if len(text.split()) >= MIN_WORDS and not text.startswith((">>>", "...", "-", "*")):
                    yield text


def main() -> None:
    seen, out = set(), []
    for text in paragraphs():
        if text not in seen:
            seen.add(text)
            out.append(textwrap.fill(text, 100))
    path = Path(__file__).resolve().parents[1] / "data" / "sample.txt"
    path.write_text("\n\n".join(out) + "\n")
    print(f"wrote {path}: {len(out)} paragraphs, {sum(len(p.split()) for p in out)} words")


if __name__ == "__main__":
    main()

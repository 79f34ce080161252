"""Text data: local .txt/.jsonl files or `datasets` names, tokenized and packed into blocks."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .errors import DataError

if TYPE_CHECKING:
    import torch

TEXT_SUFFIXES = {".txt", ".md", ".text"}
JSON_SUFFIXES = {".json", ".jsonl"}


def load_text_dataset(spec: str, *, split: str = "train", text_column: str = "text"):
    """A `datasets.Dataset` with one `text` column from a file (.gz too), a folder of .txt files, or a hub name."""
    import datasets

    path = Path(spec).expanduser()
    suffix = path.suffixes[-2] if path.suffix == ".gz" and len(path.suffixes) > 1 else path.suffix  # a.txt.gz -> .txt
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES)
        if not files:
            raise DataError(f"{path} holds no .txt/.md files to read")
        dataset = _load_local(spec, "text", files, sample_by="paragraph")
    elif path.is_file() and suffix in TEXT_SUFFIXES | JSON_SUFFIXES:
        if path.stat().st_size == 0:
            raise DataError(f"data '{spec}' is an empty file; pass a file with text")
        if suffix in TEXT_SUFFIXES:
            dataset = _load_local(spec, "text", str(path), sample_by="paragraph")
        else:
            dataset = _load_local(spec, "json", str(path))
    elif path.exists():
        raise DataError(f"{path}: unsupported data file; use .txt, .md, .json or .jsonl (optionally .gz)")
    elif suffix in TEXT_SUFFIXES | JSON_SUFFIXES or spec.startswith(("./", "../", "/", "~")):
        where = "" if path.is_absolute() else f" (relative to {Path.cwd()})"
        raise DataError(f"data file '{spec}' does not exist{where}; check the path")
    else:
        try:
            dataset = datasets.load_dataset(spec, split=split)
        except Exception as exc:
            raise DataError(f"could not load data '{spec}' ({type(exc).__name__}); pass a local .txt/.jsonl "
                            "file or a datasets name reachable from here") from None
    if text_column not in dataset.column_names:
        raise DataError(f"data '{spec}' has no column '{text_column}' (columns: {', '.join(dataset.column_names)}); "
                        "pass --text-column")
    if text_column != "text":
        dataset = dataset.rename_column(text_column, "text")
    dataset = dataset.select_columns(["text"])
    _check_strings(dataset, spec, text_column, json_lines=path.is_file() and suffix == ".jsonl")
    dataset = dataset.filter(lambda row: bool(row["text"] and row["text"].strip()))
    if len(dataset) == 0:
        raise DataError(f"data '{spec}' holds no text")
    return dataset


def _load_local(spec: str, builder: str, files, **options):
    """datasets' text/json builder on local files; a binary or malformed file is one DataError."""
    import datasets

    try:
        return datasets.load_dataset(builder, data_files=files, split="train", **options)
    except Exception as exc:  # UnicodeDecodeError, ArrowInvalid, DatasetGenerationError...
        cause = exc.__cause__ or exc
        raise DataError(f"data '{spec}' could not be read as {builder} ({type(cause).__name__}); pass a UTF-8 "
                        f"{'text' if builder == 'text' else 'JSON Lines'} file") from None


def _check_strings(dataset, spec: str, column: str, *, json_lines: bool) -> None:
    """Every value of the text column is a string (or empty): a number or a list where text belongs is one line
    naming the file, the row (a .jsonl file's line) and the type, not a tokenizer's traceback."""
    feature = dataset.features["text"]
    if getattr(feature, "dtype", None) in ("string", "large_string"):
        return
    for index, value in enumerate(dataset["text"]):
        if value is not None and not isinstance(value, str):
            where = f"line {index + 1}" if json_lines else f"row {index + 1}"
            raise DataError(f"{spec} {where}: '{column}' must be a string, got {type(value).__name__}")


def pack_blocks(dataset, tokenizer, block_size: int, *, num_proc: int | None = None):
    """Tokenize `text`, join documents with EOS and cut into `block_size` token blocks (rest dropped)."""
    eos = tokenizer.eos_token_id

    def tokenize(batch):
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"input_ids": [row + [eos] if eos is not None else row for row in ids]}

    def group(batch):
        joined = [token for row in batch["input_ids"] for token in row]
        usable = len(joined) // block_size * block_size
        return {"input_ids": [joined[i: i + block_size] for i in range(0, usable, block_size)]}

    tokens = dataset.map(tokenize, batched=True, remove_columns=dataset.column_names, num_proc=num_proc,
                         desc="tokenizing")
    return tokens.map(group, batched=True, batch_size=1000, num_proc=num_proc, desc=f"packing {block_size}-token blocks")


def require_tokens(blocks, needed: int, what: str) -> None:
    """Fail clearly when packed data is shorter than a run needs."""
    have = len(blocks) * (len(blocks[0]["input_ids"]) if len(blocks) else 0)
    if have < needed:
        raise DataError(f"{what}: the data yields {have} tokens in full blocks but {needed} are needed; "
                        "add text or lower the block size")


def heldout_blocks(spec: str | Path, tokenizer, *, block_size: int, max_tokens: int) -> torch.Tensor:
    """Held-out text packed into (blocks x block_size) token ids, at most `max_tokens` tokens: what `evaluate`
    (PPL-p%) and `matched` (perplexity, calibration) measure on."""
    import torch

    path = Path(spec)
    if path.is_file() and not path.read_text(errors="replace").strip():
        raise DataError(f"held-out text '{spec}' is empty; pass a file with text to --heldout")
    blocks = pack_blocks(load_text_dataset(str(spec)), tokenizer, block_size)
    count = min(len(blocks), max(1, max_tokens // block_size))
    if len(blocks) == 0:
        raise DataError(f"held-out text '{spec}' is shorter than one block of {block_size} tokens; "
                        "add text or lower --block-size")
    return torch.tensor(blocks[:count]["input_ids"], dtype=torch.long)

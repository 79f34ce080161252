"""scripts/build_corpus.py's decontamination: no training document may repeat an lm-eval passage."""

from conftest import load_script

build_corpus = load_script("scripts/build_corpus.py", "build_corpus")


def test_documents_sharing_a_run_of_words_with_a_task_passage_are_dropped():
    texts = build_corpus.eval_texts()
    lastword = next(text for text in texts if "debugger options are preserved" in text)
    ending = " ".join(lastword.split()[-8:])  # the item's last 8 words, its target included
    copied = f"Intro paragraph.\n{ending.upper()}, said the manual."  # case and punctuation do not hide it
    seven = " ".join(lastword.split()[-7:])  # 7 words in a row: too short to count
    kept = ["Unrelated prose about kernels and man pages.", f"We quote: {seven}"]
    assert build_corpus.decontaminate([copied, *kept], texts, 8) == kept


def test_task_passages_cover_every_task_file():
    texts = build_corpus.eval_texts()
    assert any(text.endswith(" preserved") for text in texts)  # a last-word item with its target
    assert "mechanical device that regulates movement" in texts  # a dictionary definition
    assert any(text.startswith("The `ast` module helps") for text in texts)  # a held-out docstring paragraph

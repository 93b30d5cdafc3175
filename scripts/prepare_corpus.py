"""Split the training corpus into train and validation text and train the BPE tokenizer.

Each source is cut into documents (TinyStories: stories; Shakespeare: one work
per file; King James Bible: one chapter each). The trailing documents that make
up the last 5% of a source's characters are its validation split, never trained
on. Output, under --out_dir:
  train/<source>.txt, valid/<source>.txt   documents separated by DOC_SEPARATOR
  tokenizer.json                          byte-level BPE trained on train/ only

Usage:
  python scripts/prepare_corpus.py --corpus_dir=../shared/corpus --out_dir=runs/corpus
"""

from __future__ import annotations

import glob
import os
import re

from absl import app, flags, logging

DOC_SEPARATOR = "\n<|endoftext|>\n"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2, as in Mixtral

_CORPUS_DIR = flags.DEFINE_string("corpus_dir", None, "Folder with the source texts.")
_OUT_DIR = flags.DEFINE_string("out_dir", "runs/corpus", "Output folder.")
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 4096, "BPE vocabulary size, tokens.")
_VALID_FRACTION = flags.DEFINE_float("valid_fraction", 0.05,
                                     "Share of each source's characters held out.")


def read_tinystories(corpus_dir: str) -> list[str]:
    with open(os.path.join(corpus_dir, "tinystories-sample.txt"), encoding="utf-8") as f:
        stories = f.read().split("<|endoftext|>")
    # The sample's last story is cut off mid-sentence.
    return [s.strip() for s in stories[:-1] if s.strip()]


def read_shakespeare(corpus_dir: str) -> list[str]:
    docs = []
    for path in sorted(glob.glob(os.path.join(corpus_dir, "shakespeare", "*.txt"))):
        with open(path, encoding="utf-8") as f:
            docs.append(f.read().strip())
    return docs


def read_kjv(corpus_dir: str) -> list[str]:
    with open(os.path.join(corpus_dir, "kjv.txt"), encoding="utf-8") as f:
        text = f.read()
    # A chapter starts at a heading line such as "Genesis 1" or "1 Kings 3".
    chapters = re.split(r"\n(?=(?:[1-3] )?[A-Z][A-Za-z ]+ \d+\n)", text)
    return [c.strip() for c in chapters if c.strip()]


SOURCES = {
    "tinystories": read_tinystories,
    "shakespeare": read_shakespeare,
    "kjv": read_kjv,
}


def split_documents(docs: list[str], valid_fraction: float) -> tuple[list[str], list[str]]:
    """Hold out the trailing documents holding `valid_fraction` of the characters."""
    total = sum(len(d) for d in docs)
    held = 0
    cut = len(docs)
    while cut > 1 and held < valid_fraction * total:
        cut -= 1
        held += len(docs[cut])
    return docs[:cut], docs[cut:]


def write_docs(path: str, docs: list[str]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(DOC_SEPARATOR.join(docs))
        f.write("\n")


def train_tokenizer(train_paths: list[str], vocab_size: int, out_path: str) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)

    def documents():
        for path in train_paths:
            with open(path, encoding="utf-8") as f:
                yield from f.read().split(DOC_SEPARATOR)

    tokenizer.train_from_iterator(documents(), trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    tokenizer.save(out_path)


def main(argv):
    del argv
    if not _CORPUS_DIR.value:
        raise app.UsageError("--corpus_dir is required")
    train_paths = []
    for name, reader in SOURCES.items():
        docs = reader(_CORPUS_DIR.value)
        train, valid = split_documents(docs, _VALID_FRACTION.value)
        train_path = os.path.join(_OUT_DIR.value, "train", f"{name}.txt")
        write_docs(train_path, train)
        write_docs(os.path.join(_OUT_DIR.value, "valid", f"{name}.txt"), valid)
        train_paths.append(train_path)
        logging.info("%s: %d documents, %d train, %d validation", name, len(docs),
                     len(train), len(valid))
    tokenizer_path = os.path.join(_OUT_DIR.value, "tokenizer.json")
    train_tokenizer(train_paths, _VOCAB_SIZE.value, tokenizer_path)
    logging.info("wrote %s", tokenizer_path)


if __name__ == "__main__":
    app.run(main)

"""Characters <-> integers, the lecture's tokenizer, shared by prepare.py, train.py and sample.py.

The vocabulary is the sorted set of characters of the training text, stored as plain text
(a JSON string) in meta.json and in every checkpoint, never as a pickle."""


class CharTokenizer:
    def __init__(self, chars):
        if len(set(chars)) != len(chars):
            raise ValueError("the vocabulary has repeated characters")
        self.chars = "".join(chars)
        self.stoi = {ch: i for i, ch in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text):
        return cls(sorted(set(text)))

    @property
    def vocab_size(self):
        return len(self.chars)

    def encode(self, text):
        """The token ids of text; characters outside the vocabulary are a ValueError naming them."""
        unknown = sorted(set(text) - self.stoi.keys())
        if unknown:
            shown = " ".join(repr(ch) for ch in unknown[:20])
            raise ValueError(f"{len(unknown)} character(s) not in the vocabulary: {shown}")
        return [self.stoi[ch] for ch in text]

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids)

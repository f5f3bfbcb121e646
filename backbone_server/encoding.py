"""Turning (template, examples) into token ids around the soft prompt, once per session.

Each example becomes `before` (tokens ahead of the prompt), `after` (tokens behind it)
and `read`, the position whose output scores the verbalizer; the engine splices the
prompt's vectors in between.

Rules (documented in the README):
- A template is text with the placeholders {text_a}, {text_b}, {prompt} and {mask}.
  Literal pieces are tokenised on their own, so prompt and mask positions are exact.
  Whitespace at the end of a literal moves to the start of a text that follows it (so
  "Question: {text_b}" tokenises as it reads) and is dropped before {prompt}, {mask}
  and the end.
- Masked LMs: {mask} becomes the mask token and is the read position; the tokenizer's
  special tokens (e.g. <s> ... </s>) frame the sequence.
- Causal LMs: the verbalizer is the next token after the text before {mask}; the read
  position is that text's last token and nothing after {mask} is used.
- Verbalizer words: each word is tokenised with a leading space (" great") and its first
  token is scored; two words that share a first token are refused. A class may have
  several words ("great|good"): its logit is the log of their probabilities summed.
- With no {prompt} in the template the prompt goes first, as in BBT.
- Texts longer than the model allows are refused, or with truncate=true cut from their
  end, the longest text first.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from backbone_server.errors import InvalidArgument
from blackbox.v1.verbalizer import label_words

PLACEHOLDER = re.compile(r"\{(\w+)\}")
KNOWN_FIELDS = ("text_a", "text_b", "prompt", "mask")


@dataclass(frozen=True)
class EncodedExample:
    before: tuple[int, ...]
    after: tuple[int, ...]
    read: int  # position in before + prompt + after whose output scores the verbalizer
    label: int
    truncated: bool = False

    def length(self, prompt_length: int) -> int:
        return len(self.before) + prompt_length + len(self.after)


def parse_template(template: str) -> list[tuple[str, str]]:
    """[("literal", text) | ("field", name)], validated."""
    parts: list[tuple[str, str]] = []
    position = 0
    for match in PLACEHOLDER.finditer(template):
        if match.start() > position:
            parts.append(("literal", template[position:match.start()]))
        name = match.group(1)
        if name not in KNOWN_FIELDS:
            raise InvalidArgument(f"template: unknown placeholder {{{name}}}; use {', '.join(KNOWN_FIELDS)}")
        parts.append(("field", name))
        position = match.end()
    if position < len(template):
        parts.append(("literal", template[position:]))
    fields = [name for kind, name in parts if kind == "field"]
    for name in ("text_a", "mask"):
        if fields.count(name) != 1:
            raise InvalidArgument(f"template must contain {{{name}}} exactly once: {template!r}")
    for name in ("text_b", "prompt"):
        if fields.count(name) > 1:
            raise InvalidArgument(f"template may contain {{{name}}} at most once: {template!r}")
    if "prompt" not in fields:
        parts.insert(0, ("field", "prompt"))
    return parts


def special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """The ids a tokenizer adds before and after a text (e.g. [<s>], [</s>])."""
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    framed = tokenizer("x", add_special_tokens=True)["input_ids"]
    for start in range(len(framed) - len(plain) + 1):
        if framed[start:start + len(plain)] == plain:
            return framed[:start], framed[start + len(plain):]
    return [], []


class TemplateEncoder:
    """Tokenises examples for one (tokenizer, template, architecture)."""

    def __init__(self, tokenizer, template: str, architecture: str, prompt_length: int, max_length: int):
        self.tokenizer = tokenizer
        self.parts = parse_template(template)
        self.architecture = architecture
        self.prompt_length = prompt_length
        self.max_length = max_length
        self.uses_text_b = ("field", "text_b") in self.parts
        self.prompt_position = self._prompt_position()
        self.special_prefix, self.special_suffix = special_tokens(tokenizer)
        if architecture == "causal":
            if self.parts.index(("field", "prompt")) > self.parts.index(("field", "mask")):
                raise InvalidArgument("template: {prompt} must come before {mask} for causal models")
            # Nothing after the mask is seen by a causal model's prediction at the mask.
            self.parts = self.parts[: self.parts.index(("field", "mask")) + 1]
            self.special_suffix = []
        elif tokenizer.mask_token_id is None:
            raise InvalidArgument("this masked LM's tokenizer has no mask token")
        self._literal_ids: dict[str, list[int]] = {}

    def _prompt_position(self) -> str:
        """"start", "middle" or "end": where the prompt sits relative to the texts."""
        at = self.parts.index(("field", "prompt"))
        texts = [i for i, part in enumerate(self.parts) if part in (("field", "text_a"), ("field", "text_b"))]
        if all(i > at for i in texts):
            return "start"
        return "end" if all(i < at for i in texts) else "middle"

    def _tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _literal(self, text: str) -> list[int]:
        if text not in self._literal_ids:
            self._literal_ids[text] = self._tokenize(text) if text else []
        return self._literal_ids[text]

    def verbalizer_ids(self, entries: list[str]) -> tuple[list[int], list[int]]:
        """The first token of each label word and the class it speaks for: one entry per
        class, each one word or several separated by "|" ("great|good")."""
        if len(entries) < 2:
            raise InvalidArgument(f"the verbalizer needs at least two classes, got {len(entries)}")
        ids, classes = [], []
        for label, entry in enumerate(entries):
            for word in label_words(entry):
                tokens = self._tokenize(" " + word.strip())
                if not word.strip() or not tokens:
                    raise InvalidArgument(f"verbalizer word {word!r} (of {entry!r}) tokenises to nothing")
                ids.append(tokens[0])
                classes.append(label)
        if len(set(ids)) != len(ids):
            raise InvalidArgument(
                f"verbalizer words {entries} share first tokens {ids}; choose words that start differently"
            )
        return ids, classes

    def encode(self, text_a: str, text_b: str, label: int, truncate: bool, index: int) -> EncodedExample:
        if self.uses_text_b and not text_b:
            raise InvalidArgument(f"example {index}: the template uses {{text_b}} but the example has none")
        texts = {"text_a": text_a, "text_b": text_b}
        # Token segments in order; texts are also kept by name so truncation cuts only them.
        segments: list[list] = [list(self.special_prefix)]
        text_segments: dict[str, list[int]] = {}
        pending_space = ""
        prompt_at = mask_at = None
        for kind, value in self.parts:
            if kind == "literal":
                stripped = value.rstrip()
                pending_space = value[len(stripped):]
                segments.append(self._literal(stripped))
                continue
            if value in texts:
                ids = self._tokenize(pending_space[-1:] + texts[value].strip())
                text_segments[value] = ids
                segments.append(ids)
            elif value == "prompt":
                prompt_at = len(segments)
                segments.append([])
            else:
                mask_at = len(segments)
                segments.append([self.tokenizer.mask_token_id] if self.architecture == "masked" else [])
            pending_space = ""
        segments.append(list(self.special_suffix))

        truncated = False
        excess = sum(map(len, segments)) + self.prompt_length - self.max_length
        if excess > 0:
            if not truncate:
                opening = " ".join(text_a.split()[:8])
                raise InvalidArgument(
                    f"example {index} (\"{opening} ...\") needs {excess + self.max_length} tokens with the "
                    f"prompt, more than the model's {self.max_length}; shorten it or create the session with "
                    "truncate=true"
                )
            truncated = True
            while excess > 0:
                longest = max(text_segments.values(), key=len)
                if len(longest) <= 1:
                    raise InvalidArgument(f"example {index}: the template alone exceeds {self.max_length} tokens")
                cut = min(excess, len(longest) - 1)
                del longest[len(longest) - cut:]
                excess -= cut

        before = [t for segment in segments[:prompt_at] for t in segment]
        after = [t for segment in segments[prompt_at + 1:] for t in segment]
        mask_position = sum(map(len, segments[:mask_at])) + (self.prompt_length if mask_at > prompt_at else 0)
        if self.architecture == "masked":
            read = mask_position
        else:
            # A causal model predicts the token at {mask} from the position before it.
            read = mask_position - 1
            if read < 0:
                raise InvalidArgument("template: a causal model needs a token before {mask}")
        return EncodedExample(tuple(before), tuple(after), read, int(label), truncated)

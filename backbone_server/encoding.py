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
  end, the longest text first. A text of more than CHARS_PER_TOKEN characters per token
  the model takes is refused (or cut to that many characters) before it is tokenised;
  a template has at most MAX_TEMPLATE_CHARS characters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from backbone_server.errors import SHOWN_CHARS, InvalidArgument, shown
from blackbox.v1.verbalizer import label_words

PLACEHOLDER = re.compile(r"\{(\w+)\}")
KNOWN_FIELDS = ("text_a", "text_b", "prompt", "mask")
MAX_TEMPLATE_CHARS = 10_000  # a template is a sentence or two around the texts, never a document
# A text is cut (with truncate) or refused (without) at max_length * CHARS_PER_TOKEN
# characters before it is tokenised: tokenising all of a 20 MB text only to keep its
# first max_length tokens costs gigabytes. The bound is safe: a token covers a few
# characters (about 4 of English text in BPE vocabularies, fewer in most other scripts)
# and the longest vocabulary entries (runs of spaces or dashes in code-trained
# vocabularies) a few dozen, so the first max_length tokens of any text end long before
# character max_length * 64, and a cut there changes only the tokens of the word it
# splits, which truncation removes anyway: the tokens kept are those of the whole text.
# Only texts made mostly of what tokenizers drop (control characters, combining marks a
# normaliser strips) hold fewer tokens than that; they are cut or refused as if they
# were long, the message saying why.
CHARS_PER_TOKEN = 64


def _opening(text: str) -> str:
    """A text's first words, for naming its example: at most 8 words and SHOWN_CHARS characters."""
    return " ".join(text[:16 * SHOWN_CHARS].split()[:8])[:SHOWN_CHARS]


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
    if len(template) > MAX_TEMPLATE_CHARS:
        raise InvalidArgument(f"the template has {len(template):,} characters, more than the {MAX_TEMPLATE_CHARS:,} "
                              f"a template may have ({shown(template)}); put long text in the examples' texts")
    parts: list[tuple[str, str]] = []
    position = 0
    for match in PLACEHOLDER.finditer(template):
        if match.start() > position:
            parts.append(("literal", template[position:match.start()]))
        name = match.group(1)
        if name not in KNOWN_FIELDS:
            raise InvalidArgument(f"template: unknown placeholder {{{name[:SHOWN_CHARS]}}}; use "
                                  f"{', '.join(KNOWN_FIELDS)}")
        parts.append(("field", name))
        position = match.end()
    if position < len(template):
        parts.append(("literal", template[position:]))
    fields = [name for kind, name in parts if kind == "field"]
    for name in ("text_a", "mask"):
        if fields.count(name) != 1:
            raise InvalidArgument(f"template must contain {{{name}}} exactly once: {shown(template)}")
    for name in ("text_b", "prompt"):
        if fields.count(name) > 1:
            raise InvalidArgument(f"template may contain {{{name}}} at most once: {shown(template)}")
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
        if prompt_length > max_length:
            raise InvalidArgument(f"prompt_length {prompt_length} is more than the {max_length} tokens this model "
                                  f"takes; choose at most {max_length}, less the template's and the texts' tokens")
        self.tokenizer = tokenizer
        self.parts = parse_template(template)
        self.architecture = architecture
        self.prompt_length = prompt_length
        self.max_length = max_length
        self.max_chars = max_length * CHARS_PER_TOKEN  # a text's characters before it is tokenised
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
                    raise InvalidArgument(f"verbalizer word {shown(word)} (of {shown(entry)}) tokenises to nothing")
                ids.append(tokens[0])
                classes.append(label)
        if len(set(ids)) != len(ids):
            words, firsts = str(entries), str(ids)
            raise InvalidArgument(
                f"verbalizer words {words[:4 * SHOWN_CHARS]}{'...' if len(words) > 4 * SHOWN_CHARS else ''} share "
                f"first tokens {firsts[:SHOWN_CHARS]}{'...' if len(firsts) > SHOWN_CHARS else ''}; choose words "
                "that start differently"
            )
        return ids, classes

    def encode(self, text_a: str, text_b: str, label: int, truncate: bool, index: int) -> EncodedExample:
        if self.uses_text_b and not text_b:
            raise InvalidArgument(f"example {index}: the template uses {{text_b}} but the example has none")
        texts = {"text_a": (text_a or "").strip(), "text_b": (text_b or "").strip()}
        # Before anything is tokenised: a text no model length holds (CHARS_PER_TOKEN).
        cut_texts = {name for name, text in texts.items()
                     if len(text) > self.max_chars and ("field", name) in self.parts}
        if cut_texts and not truncate:
            name = min(cut_texts, key=list(texts).index)
            raise InvalidArgument(
                f"example {index} (\"{_opening(texts['text_a'])} ...\"): its {name} has {len(texts[name]):,} "
                f"characters, more than the {self.max_chars:,} ({CHARS_PER_TOKEN} per token of the model's "
                f"{self.max_length}) a text that fits can have; shorten it or create the session with truncate=true"
            )
        for name in cut_texts:
            texts[name] = texts[name][:self.max_chars]
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
                ids = self._tokenize(pending_space[-1:] + texts[value])
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

        truncated = bool(cut_texts)
        excess = sum(map(len, segments)) + self.prompt_length - self.max_length
        if excess > 0:
            if not truncate:
                raise InvalidArgument(
                    f"example {index} (\"{_opening(texts['text_a'])} ...\") needs {excess + self.max_length} "
                    f"tokens with the prompt, more than the model's {self.max_length}; shorten it or create the "
                    "session with truncate=true"
                )
            truncated = True
            # The longest text first. A text cut to max_chars counts as longer than any other
            # until truncation has cut it: its whole text is, unless the other has fewer
            # characters a token (both texts far beyond the model's length).
            longer = set(cut_texts)
            while excess > 0:
                name = max(text_segments, key=lambda name: (name in longer, len(text_segments[name])))
                longest = text_segments[name]
                longer.discard(name)
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

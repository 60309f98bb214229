"""Safe YAML loading that remembers where every value came from.

PyYAML's composer is slow (8 s for a 100,000-job file) and its constructor forgets positions, so
values are built here straight from the parser's events (the C parser when present). Alongside the
plain Python value comes a `Marks` tree giving the line and column of every key and value, which
every later error message points at.

Refused, each with its location: tags outside YAML's core set (`!!python/...` and custom tags),
duplicate keys in one mapping, aliases that would expand past a node or byte budget (alias bombs), files
over a size cap, and bytes that are not UTF-8.
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from yaml import events as ev

from batchrun import echo
from batchrun.errors import ManifestError, Problem
from batchrun.inputfile import NotARegularFile, read_regular

try:  # the C parser is about 10x faster; fall back silently where libyaml is absent
    from yaml import CSafeLoader as _Loader
except ImportError:  # pragma: no cover - depends on how PyYAML was built
    from yaml import SafeLoader as _Loader

MAX_FILE_BYTES = 32 * 1024 * 1024
# Counted after alias expansion; a 100,000-job manifest has about 500,000 nodes.
MAX_EXPANDED_NODES = 5_000_000
# Counted after alias expansion, in bytes of text (scalars and keys). A manifest without aliases cannot
# reach it (its text is at most MAX_FILE_BYTES); with aliases, every job's input is serialised whole
# (digest, ledger row, request), so a small file that expands to gigabytes (a 100 KB string aliased 300 x
# 300 times is 9 GB) would exhaust memory. 64 MiB is twice the file cap and the size of the largest
# request RunComfy's clients send: 100,000 jobs can each merge 600 bytes of shared fields with `<<`.
MAX_EXPANDED_BYTES = 64 * 2**20
# Nesting deeper than this is refused (it would otherwise exhaust Python's recursion limit).
MAX_DEPTH = 100

Pos = tuple[int, int]  # 1-based line and column

_CORE = "tag:yaml.org,2002:"
_STR = _CORE + "str"
_SCALAR_TAGS = {
    _STR,
    "tag:yaml.org,2002:int",
    "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:bool",
    "tag:yaml.org,2002:null",
    "tag:yaml.org,2002:timestamp",
}
_MAP_TAGS = {None, "tag:yaml.org,2002:map", "!"}
_SEQ_TAGS = {None, "tag:yaml.org,2002:seq", "!"}
_resolver = yaml.resolver.Resolver()
_constructor = yaml.SafeLoader("")


@dataclass(slots=True)
class Marks:
    """Where a mapping or sequence and its children stand in the file; read it with `position_of` and
    `node_at`, which give `Pos` tuples.

    A 100,000-job manifest has about 600,000 positions, kept while its jobs are checked, so inside the
    tree a scalar's position is one int, `line << _COLUMN_BITS | column` (a third of the memory of a tuple
    of two ints).
    For a sequence, `children` is a list of children: a `Marks` for a container, a packed position for
    a scalar. For a mapping, it maps each key to its key's and its value's positions: one int for a
    scalar value (`key << 64 | value`, both packed), `(packed key position, Marks)` for a container.
    `pos` is the container's own position.
    """

    pos: Pos
    children: dict[str, int | tuple[int, Marks]] | list[Marks | int] = field(default_factory=dict)


_COLUMN_BITS = 32  # a column is below 2**32: a line of 4 GiB cannot be read (files are capped at 32 MiB)
_COLUMN_MASK = (1 << _COLUMN_BITS) - 1
_POS_MASK = (1 << 2 * _COLUMN_BITS) - 1


def _unpack(packed: int | Pos) -> Pos:
    return packed if isinstance(packed, tuple) else (packed >> _COLUMN_BITS, packed & _COLUMN_MASK)


def _entry(entry: int | tuple[int, Marks]) -> tuple[int, Marks | int]:
    """A mapping child's (packed key position, child)."""
    return (entry >> 2 * _COLUMN_BITS, entry & _POS_MASK) if isinstance(entry, int) else entry


def position_of(marks: Marks | Pos, path: tuple, *, key: bool = False) -> Pos:
    """The position of the deepest node along `path` that exists.

    With `key=True` and a path ending in a mapping key, points at the key rather than its value,
    which is where a user looks for a misspelt or unexpected key.
    """
    current: Marks | Pos | int = marks
    for i, step in enumerate(path):
        if not isinstance(current, Marks):
            break
        children = current.children
        if isinstance(children, dict) and isinstance(step, str) and step in children:
            key_pos, child = _entry(children[step])
            if key and i == len(path) - 1:
                return _unpack(key_pos)
            current = child
        elif isinstance(children, list) and isinstance(step, int) and 0 <= step < len(children):
            current = children[step]
        else:
            break
    return current.pos if isinstance(current, Marks) else _unpack(current)


def node_at(marks: Marks | Pos, path: tuple) -> Marks | Pos:
    """The marks of the deepest node along `path` that exists (a position for a scalar)."""
    current: Marks | Pos | int = marks
    for step in path:
        children = current.children if isinstance(current, Marks) else None
        if isinstance(children, dict) and isinstance(step, str) and step in children:
            current = _entry(children[step])[1]
        elif isinstance(children, list) and isinstance(step, int) and 0 <= step < len(children):
            current = children[step]
        else:
            break
    return current if isinstance(current, Marks) else _unpack(current)


def _pos(mark) -> Pos:
    return (mark.line + 1, mark.column + 1)


def _shown_tag(tag: str) -> str:
    return "!!" + tag[len(_CORE):] if tag.startswith(_CORE) else tag


def _tag_refused(tag: str, node: str | None = None) -> str:
    """Why `tag` is refused; `node` ("list", "mapping") when a core tag is put on a node it does not fit."""
    shown = echo.cut(_shown_tag(tag), 80)
    if node and (tag in _SCALAR_TAGS or tag in _MAP_TAGS or tag in _SEQ_TAGS):
        return f"the tag {shown} cannot be put on a {node}"
    return f"the tag {shown} is not allowed (only plain YAML data)"


class _Refused(Exception):
    def __init__(self, pos: Pos, message: str):
        self.pos = pos
        self.message = message


# What an explicitly tagged scalar may say. PyYAML's constructors take any text and fail in several ways
# (KeyError for `!!bool maybe`, IndexError for an empty `!!float`, or no failure at all: `!!null x` is
# None), so the text is checked against the tag first. !!float also takes integers ("!!float 1" is 1.0).
_TAG_TEXT = {
    _CORE + "bool": re.compile(r"(?i:yes|no|true|false|on|off)"),
    _CORE + "null": re.compile(r"~|null|Null|NULL|"),
    _CORE + "int": re.compile(r"[-+]?(?:0b[01_]+|0x[0-9a-fA-F_]+|0o?[0-7_]+|[0-9][0-9_]*(?::[0-5]?[0-9])*)"),
    _CORE + "float": re.compile(r"[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)(?:[eE][-+]?[0-9]+)?"
                                r"|[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)"),
    _CORE + "timestamp": re.compile(r"[0-9]{4}-[0-9]{1,2}-[0-9]{1,2}(?:(?:[Tt]|[ \t]+)[0-9]{1,2}:[0-9]{2}:[0-9]{2}"
                                    r"(?:\.[0-9]*)?(?:[ \t]*(?:Z|[-+][0-9]{1,2}(?::[0-9]{2})?))?)?"),
}


def _invalid(event: ev.ScalarEvent, tag: str) -> _Refused:
    return _Refused(_pos(event.start_mark), f"{echo.quoted(event.value, 40)} is not a valid {tag[len(_CORE):]}")


def _scalar(event: ev.ScalarEvent) -> Any:
    tag = event.tag
    if tag in (None, "!"):
        if tag == "!" or not event.implicit[0]:  # quoted, or explicitly non-specific: a string
            return event.value
        tag = _resolver.resolve(yaml.ScalarNode, event.value, event.implicit)
        if tag not in _SCALAR_TAGS:  # a plain "=" or "<<" (YAML 1.1's value and merge keys) is text here
            return event.value
    elif tag not in _SCALAR_TAGS:
        raise _Refused(_pos(event.start_mark), _tag_refused(tag, "single value"))
    if tag == _STR:
        return event.value
    if event.tag == tag and not _TAG_TEXT[tag].fullmatch(event.value):
        raise _invalid(event, tag)
    if tag == _CORE + "timestamp":  # dates stay as typed: inputs are JSON
        return event.value
    try:
        value = _constructor.yaml_constructors[tag](_constructor, yaml.ScalarNode(tag, event.value))
    except (ValueError, yaml.YAMLError) as exc:  # also ints over Python's 4,300-digit limit
        raise _invalid(event, tag) from exc
    if isinstance(value, float) and not math.isfinite(value):  # JSON has no NaN or infinity
        raise _Refused(_pos(event.start_mark),
                       f"{echo.quoted(event.value, 40)} is not a finite number (manifest values must be JSON)")
    return value


def _text_bytes(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


_SCALAR, _ALIAS = ev.ScalarEvent, ev.AliasEvent
_SEQUENCE_START, _SEQUENCE_END = ev.SequenceStartEvent, ev.SequenceEndEvent
_MAPPING_START, _MAPPING_END = ev.MappingStartEvent, ev.MappingEndEvent
# The first characters of a plain scalar that some implicit tag (int, bool, null...) may claim: any other
# plain scalar is text without asking the resolver (about half the cost of a 100,000-job load's scalars).
_IMPLICIT_FIRST = frozenset(_resolver.yaml_implicit_resolvers)
_ANY_FIRST = None in _IMPLICIT_FIRST  # a resolver for every first character: always ask


class _Builder:
    """Turns the parser's event stream into (value, marks), counting the nodes and the bytes of text
    (scalars and keys) that the document holds once every alias is expanded.

    `get_event` is the parser's own: called directly, it saves a generator step and a `check_event`
    call per event. The event classes are PyYAML's (the C parser makes the same ones), compared by type.
    """

    def __init__(self, get_event):
        self.get_event = get_event
        self.anchors: dict[str, tuple[Any, Marks | int, int, int]] = {}
        self.expanded = 0
        self.expanded_bytes = 0
        self.depth = 0

    def _count(self, nodes: int, nbytes: int, pos: Pos) -> None:
        self.expanded += nodes
        self.expanded_bytes += nbytes
        if self.expanded > MAX_EXPANDED_NODES:
            raise _Refused(pos, f"aliases expand past {MAX_EXPANDED_NODES:,} nodes (an alias bomb?)")
        if self.expanded_bytes > MAX_EXPANDED_BYTES:
            raise _Refused(pos, f"aliases expand past {MAX_EXPANDED_BYTES // 2**20} MiB of text (an alias bomb?)")

    def node(self, event) -> tuple[Any, Marks | int, int, int]:
        """Build the node that starts with `event`; returns (value, marks, expanded nodes, expanded bytes)."""
        kind = type(event)
        if kind is _SCALAR:
            return self._leaf(event)
        if kind is _ALIAS:
            if event.anchor not in self.anchors:
                raise _Refused(_pos(event.start_mark), f"unknown alias *{echo.cut(event.anchor, 80)}")
            built = self.anchors[event.anchor]
            self._count(built[2], built[3], _pos(event.start_mark))
            return built
        if kind is _SEQUENCE_START or kind is _MAPPING_START:
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise _Refused(_pos(event.start_mark), f"nested more than {MAX_DEPTH} levels deep")
            built = self._sequence(event) if kind is _SEQUENCE_START else self._mapping(event)
            self.depth -= 1
            if event.anchor:
                self.anchors[event.anchor] = built
            return built
        raise _Refused(_pos(event.start_mark), "unexpected YAML structure")  # pragma: no cover - parser's order

    def _leaf(self, event: ev.ScalarEvent) -> tuple[Any, int, int, int]:
        """A scalar node (the bulk of a manifest): `node`'s work for it, with its common case inlined."""
        text = event.value
        nbytes = len(text) if text.isascii() else _text_bytes(text)
        mark = event.start_mark
        pos = (mark.line + 1) << _COLUMN_BITS | (mark.column + 1)  # packed (see `Marks`)
        self.expanded += 1
        self.expanded_bytes += nbytes
        if self.expanded > MAX_EXPANDED_NODES or self.expanded_bytes > MAX_EXPANDED_BYTES:
            self._count(0, 0, _pos(mark))  # raises the refusal
        if event.tag is None and (not event.implicit[0]
                                  or (text and not _ANY_FIRST and text[0] not in _IMPLICIT_FIRST)):
            built = (text, pos, 1, nbytes)  # quoted, or plain text no implicit tag can claim
        else:
            built = (_scalar(event), pos, 1, nbytes)
        if event.anchor:
            self.anchors[event.anchor] = built
        return built

    def _sequence(self, start: ev.SequenceStartEvent):
        if start.tag not in _SEQ_TAGS:
            raise _Refused(_pos(start.start_mark), _tag_refused(start.tag, "list"))
        start_pos = _pos(start.start_mark)
        items, marks, nodes, nbytes = [], [], 1, 0
        self._count(1, 0, start_pos)
        get_event, leaf, node = self.get_event, self._leaf, self.node
        while True:
            event = get_event()
            kind = type(event)
            if kind is _SEQUENCE_END:
                return items, Marks(start_pos, marks), nodes, nbytes
            value, mark, n, b = leaf(event) if kind is _SCALAR else node(event)
            items.append(value)
            marks.append(mark)
            nodes += n
            nbytes += b

    def _mapping(self, start: ev.MappingStartEvent):
        if start.tag not in _MAP_TAGS:
            raise _Refused(_pos(start.start_mark), _tag_refused(start.tag, "mapping"))
        start_pos = _pos(start.start_mark)
        value: dict[str, Any] = {}
        marks: dict[str, int | tuple[int, Marks]] = {}
        merged: list[tuple[dict, Marks]] = []
        nodes, nbytes = 1, 0
        self._count(1, 0, start_pos)
        get_event, leaf, node = self.get_event, self._leaf, self.node
        while True:
            event = get_event()
            kind = type(event)
            if kind is _MAPPING_END:
                break
            if kind is not _SCALAR:
                raise _Refused(_pos(event.start_mark), "mapping keys must be plain text")
            # Interned: every job repeats the same few keys (one string each, not one per job).
            key, mark = sys.intern(event.value), event.start_mark
            key_pos = (mark.line + 1) << _COLUMN_BITS | (mark.column + 1)  # packed (see `Marks`)
            if event.tag not in (None, "!"):
                _scalar(event)  # a tagged key is kept as text, but its tag must fit it as anywhere else
            key_bytes = len(key) if key.isascii() else _text_bytes(key)
            self.expanded_bytes += key_bytes  # checked by the value's own count, next
            plain_key = event.implicit[0]
            event = get_event()
            child, child_marks, n, b = leaf(event) if type(event) is _SCALAR else node(event)
            nodes += n
            nbytes += b + key_bytes
            if key == "<<" and plain_key:
                merged.extend(self._merge_sources(child, child_marks, _unpack(key_pos)))
                continue
            if key in value:
                line = _unpack(_entry(marks[key])[0])[0]
                raise _Refused(_unpack(key_pos), f"duplicate key {echo.quoted(key)} (first defined on line {line})")
            value[key] = child
            marks[key] = key_pos << 2 * _COLUMN_BITS | child_marks if type(child_marks) is int \
                else (key_pos, child_marks)
        for source, source_marks in merged:  # YAML merge keys: explicit keys win
            for key, item in source.items():
                if key not in value:
                    value[key] = item
                    marks[key] = source_marks.children[key]
        return value, Marks(start_pos, marks), nodes, nbytes

    @staticmethod
    def _merge_sources(child, child_marks, pos: Pos):
        if isinstance(child, dict):
            return [(child, child_marks)]
        if isinstance(child, list) and all(isinstance(c, dict) for c in child):
            return list(zip(child, child_marks.children, strict=True))
        raise _Refused(pos, "'<<' must merge a mapping or a list of mappings")


def _decode(data: bytes, name: str) -> str:
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        before = data[: exc.start]
        line = before.count(b"\n") + 1
        column = len(before[before.rfind(b"\n") + 1 :].decode("utf-8")) + 1  # in characters, as editors count
        raise ManifestError(
            [Problem(name, line, column, "", f"the file is not UTF-8 text (byte 0x{data[exc.start]:02x})")]
        ) from None


def _reader_error_problem(exc: yaml.reader.ReaderError, text: str, name: str) -> Problem:
    """A character YAML forbids (control characters). libyaml gives a UTF-8 byte offset."""
    offset = exc.position
    if _Loader.__name__.startswith("C"):
        offset = len(text.encode("utf-8")[: exc.position].decode("utf-8", errors="ignore"))
    before = text[:offset]
    line, column = before.count("\n") + 1, offset - (before.rfind("\n") + 1) + 1
    char = exc.character if isinstance(exc.character, int) else ord(exc.character)
    return Problem(name, line, column, "", f"the character U+{char:04X} is not allowed in YAML ({exc.reason})")


def _yaml_error_problem(exc: yaml.YAMLError, text: str, name: str) -> Problem:
    if isinstance(exc, yaml.reader.ReaderError):
        return _reader_error_problem(exc, text, name)
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    line, column = _pos(mark) if mark else (1, 1)
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    message = " ".join(f"YAML syntax error: {problem}".split()) + (f" ({context})" if context else "")
    opened = getattr(exc, "context_mark", None)
    if opened is not None and mark is not None and opened.index != mark.index \
            and text[opened.index : opened.index + 1] in ("'", '"'):
        # An unclosed quote: YAML notices it far below (often at the end of the file); the place to fix is
        # where the quote opened.
        quote = text[opened.index]
        message = (f"YAML syntax error: the {quote} opened here is not closed (YAML noticed at line {line}, "
                   f"column {column}: {' '.join(str(problem).split())}); close it (for a quote inside the "
                   "text, put the text in the other kind of quotes)")
        line, column = _pos(opened)
        return Problem(name, line, column, "", message)
    at_tab = mark is not None and text[mark.index : mark.index + 1] == "\t"
    if at_tab or "tab character" in message:
        message += "; use spaces, not tabs, to indent"
    elif mark is not None and (key := _unquoted_colon_key(text, mark.line)):
        message += f"; put the text in quotes, like {key}: \"...\" (an unquoted ': ' inside it starts a new key)"
    return Problem(name, line, column, "", message)


# `key: plain text: more`: a value that is not quoted, holding a colon followed by a space (or ending the line).
_UNQUOTED_COLON = re.compile(r"""^\s*(?:-\s+)?([A-Za-z_][\w-]*):[ \t]+([^'"\s|>&*!{\[#][^#]*?):(?:[ \t]|$)""")


def _unquoted_colon_key(text: str, line_index: int) -> str | None:
    """The key of line `line_index` (0-based) when its value is plain text with a `: ` inside, the usual
    cause of YAML's complaint about a mapping value there (`prompt: A cat: the sequel`); None otherwise."""
    lines = text.splitlines()
    if not 0 <= line_index < len(lines):
        return None
    found = _UNQUOTED_COLON.match(lines[line_index])
    return found.group(1) if found else None


def _build(text: str, loader) -> tuple[Any, Marks | Pos] | None:
    """Build the single document of `text` with `loader`'s parser; None for an empty stream."""
    parser = loader(text)
    try:
        get_event = parser.get_event
        builder = _Builder(get_event)
        document = None
        while True:
            event = get_event()
            kind = type(event)
            if kind is ev.StreamEndEvent or event is None:
                return document
            if kind is ev.DocumentStartEvent:
                if document is not None:
                    raise _Refused(_pos(event.start_mark), "only one YAML document is allowed per manifest")
                document = builder.node(get_event())[:2]
    finally:
        parser.dispose()


def _own_refusal_before(text: str, exc: yaml.YAMLError) -> _Refused | None:
    """batchrun's own refusal (depth, aliases, tags...) in the text before a parser error, if any.

    libyaml scans up to 1,024 characters ahead of the events it hands out, so a limit of its own
    (PyYAML 6.0.4's wheels refuse nesting past 1,000) can fire before the builder has seen the node
    that breaks batchrun's limit. Re-reading just the text before the error with the pure-Python
    parser, which has no such limit, lets batchrun's own, documented refusal be the one reported.
    """
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    if mark is None or _Loader is yaml.SafeLoader or isinstance(exc, yaml.reader.ReaderError):
        return None
    try:
        _build(text[: mark.index], yaml.SafeLoader)
    except _Refused as refused:
        return refused
    except yaml.YAMLError:  # the prefix ends mid-node: whatever it says, the first error stands
        return None
    return None


def load_text(text: str, name: str) -> tuple[Any, Marks | Pos]:
    """Parse one YAML document into (value, marks). Raises ManifestError with one Problem."""
    if not text.strip():
        raise ManifestError([Problem(name, 1, 1, "", "the manifest is empty")])
    try:
        document = _build(text, _Loader)
    except _Refused as exc:
        raise ManifestError([Problem(name, exc.pos[0], exc.pos[1], "", exc.message)]) from None
    except yaml.YAMLError as exc:
        own = _own_refusal_before(text, exc)
        if own is not None:
            raise ManifestError([Problem(name, own.pos[0], own.pos[1], "", own.message)]) from None
        raise ManifestError([_yaml_error_problem(exc, text, name)]) from None
    if document is None:
        raise ManifestError([Problem(name, 1, 1, "", "the manifest is empty")])
    value, marks = document
    return value, marks if isinstance(marks, Marks) else _unpack(marks)


def load_file(path: Path, *, max_bytes: int = MAX_FILE_BYTES) -> tuple[Any, Marks | Pos]:
    """Read and parse a manifest file, refusing anything but a regular file (see `batchrun.inputfile`),
    oversized files and non-UTF-8 files."""
    name = str(path)

    def refuse(message: str) -> ManifestError:
        return ManifestError([Problem(name, 1, 1, "", message)])

    try:
        data, size = read_regular(path, max_bytes)
    except NotARegularFile as exc:
        if exc.folder:
            raise refuse("is a directory, not a manifest file") from None
        raise refuse(f"{exc}: batchrun reads manifests only from regular files") from None
    except FileNotFoundError:
        raise refuse("no such file") from None
    except OSError as exc:
        raise refuse(f"cannot read the file: {exc.strerror or exc}") from None
    except ValueError as exc:  # such as a NUL byte in the path
        raise refuse(f"cannot read the file: {exc}") from None
    if len(data) > max_bytes:
        raise refuse(f"the file is {size / 2**20:.1f} MiB; manifests are limited to {max_bytes // 2**20} MiB "
                     "(split the batch into several manifests)")
    text = _decode(data, name)
    del data  # 32 MiB at most, not to be held while the document is built
    return load_text(text, name)

"""
Incremental body parsers: bytes go in as they arrive, fields come out as
soon as each is complete.

Every parser has ``feed(data)`` and ``close()`` and reports to a
:class:`FieldSink`.  They never keep more than the field being parsed (a
text field up to ``max_field_bytes``; file data is handed on as it comes),
and raise a :class:`~pipecomet._errors.PipecometError` naming the problem
on malformed input, so the client gets a 400 or 413, never a 500.
"""

from __future__ import annotations

import codecs
import json
import re
from typing import TYPE_CHECKING, Callable, NoReturn, Protocol, TypeAlias

from .._errors import BadRequest, PayloadTooLarge

__all__ = [
    "FieldSink",
    "FormParser",
    "MultipartParser",
    "JSONParser",
    "RawParser",
    "parse_content_type",
    "text_decoder",
    "decode_json",
    "TEXT_CHARSETS",
    "make_parser",
]


if TYPE_CHECKING:
    from .._json import JSON


class FieldSink(Protocol):
    def field(self, name: str, value: JSON) -> None: ...
    def file_start(self, name: str, filename: str, content_type: str) -> None: ...
    def file_data(self, data: bytes) -> None: ...
    def file_end(self) -> None: ...


# ---------------------------------------------------------------------------
# Header values


_TOKEN_PARAM = re.compile(
    rb'\s*;\s*([!#$%&\'*+.^_`|~0-9A-Za-z-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)', re.S
)


def parse_content_type(value: bytes | None) -> tuple[str, dict[str, str]]:
    """
    ``(media type, {param: value})`` of a Content-Type or
    Content-Disposition value; names are lower-cased, quotes removed.
    """
    if not value:
        return "", {}
    head, sep, rest = value.partition(b";")
    params: dict[str, str] = {}
    if sep:
        for m in _TOKEN_PARAM.finditer(b";" + rest):
            v = m.group(2).strip()
            if v[:1] == b'"' and v[-1:] == b'"' and len(v) >= 2:
                v = re.sub(rb"\\(.)", rb"\1", v[1:-1])
            params[m.group(1).decode("ascii").lower()] = v.decode("utf-8", "replace")
    return head.strip().decode("latin-1").lower(), params


#: The charsets a body may declare: text encodings only.  Python's codec
#: registry also holds bytes-to-bytes and bytes-to-text transforms (``bz2``,
#: ``base64``, ``rot13``, ``uu``, ``punycode``...) that must never be run on
#: a client's bytes; a name counts when it resolves to one of these codecs.
TEXT_CHARSETS = frozenset(codecs.lookup(n).name for n in (
    "utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le",
    "utf-32-be", "ascii", "latin-1", "iso8859-2", "iso8859-3", "iso8859-4", "iso8859-5",
    "iso8859-6", "iso8859-7", "iso8859-8", "iso8859-9", "iso8859-10", "iso8859-11",
    "iso8859-13", "iso8859-14", "iso8859-15", "iso8859-16", "cp1250", "cp1251", "cp1252",
    "cp1253", "cp1254", "cp1255", "cp1256", "cp1257", "cp1258", "cp437", "cp850", "cp866",
    "koi8-r", "koi8-u", "mac-roman", "shift_jis", "cp932", "euc-jp", "iso2022-jp",
    "euc-kr", "cp949", "gb2312", "gbk", "gb18030", "big5", "big5hkscs", "cp950", "tis-620",
))


def _unsupported_charset(name: str) -> BadRequest:
    return BadRequest(f"unsupported charset {name[:40]!r}", code="unsupported_charset",
                      details={"charset": name[:40]})


def text_decoder(charset: str | None) -> Callable[[bytes], str]:
    """
    A strict decoder for ``charset`` (UTF-8 when None); a charset that is
    unknown or not a text encoding (see :data:`TEXT_CHARSETS`) is a 400
    ``unsupported_charset``.
    """
    name = (charset or "utf-8").strip().lower()
    try:
        info = codecs.lookup(name)
    except LookupError:
        raise _unsupported_charset(name) from None
    if info.name not in TEXT_CHARSETS:
        raise _unsupported_charset(name)
    decode = info.decode

    def dec(raw: bytes) -> str:
        try:
            return decode(raw, "strict")[0]
        except UnicodeDecodeError as e:
            raise BadRequest(f"body is not valid {name}: {e.reason} at byte {e.start}",
                             code="bad_charset", details={"charset": name}) from None

    return dec


def _too_many_fields(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"more than {limit} form fields", code="too_many_fields",
                           details={"limit": limit})


def _field_too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"a form field is larger than {limit} bytes", code="field_too_large",
                           details={"limit": limit})


# ---------------------------------------------------------------------------
# application/x-www-form-urlencoded


_BAD_PERCENT = re.compile(rb"%(?![0-9A-Fa-f]{2})")
_PERCENT = re.compile(rb"%([0-9A-Fa-f]{2})")


def _unquote_plus(raw: bytes) -> bytes:
    if b"+" in raw:
        raw = raw.replace(b"+", b" ")
    if b"%" not in raw:
        return raw
    bad = _BAD_PERCENT.search(raw)
    if bad is not None:
        snippet = raw[bad.start():bad.start() + 3].decode("latin-1")
        raise BadRequest(f"bad percent-encoding {snippet!r} in form body",
                         code="bad_percent_encoding")
    return _PERCENT.sub(lambda m: bytes((int(m.group(1), 16),)), raw)


class FormParser:
    """
    ``application/x-www-form-urlencoded``: a field is complete at its ``&``
    (or at the end of the body).  Strict: a ``%`` not followed by two hex
    digits or bytes that are not valid in the charset are errors.
    """

    __slots__ = ("sink", "max_fields", "max_field_bytes", "_buf", "_count", "_decode")

    def __init__(self, sink: FieldSink, *, charset: str | None = None, max_fields: int = 1000,
                 max_field_bytes: int = 2**20) -> None:
        self.sink = sink
        self.max_fields = max_fields
        self.max_field_bytes = max_field_bytes
        self._buf = bytearray()
        self._count = 0
        self._decode = text_decoder(charset)

    def feed(self, data: bytes) -> None:
        start = 0
        find = data.find
        while True:
            i = find(b"&", start)
            if i < 0:
                break
            if self._buf:
                self._buf += data[start:i]
                raw = bytes(self._buf)
                self._buf.clear()
            else:
                raw = data[start:i]
            self._emit(raw)
            start = i + 1
        rest = len(data) - start
        if rest:
            if len(self._buf) + rest > self.max_field_bytes:
                raise _field_too_large(self.max_field_bytes)
            self._buf += data[start:] if start else data

    def close(self) -> None:
        if self._buf:
            raw = bytes(self._buf)
            self._buf.clear()
            self._emit(raw)

    def _emit(self, raw: bytes) -> None:
        if not raw:
            return
        if len(raw) > self.max_field_bytes:
            raise _field_too_large(self.max_field_bytes)
        self._count += 1
        if self._count > self.max_fields:
            raise _too_many_fields(self.max_fields)
        name, _, value = raw.partition(b"=")
        decode = self._decode
        self.sink.field(decode(_unquote_plus(name)), decode(_unquote_plus(value)))


# ---------------------------------------------------------------------------
# multipart/form-data

_PREAMBLE, _HEADERS, _DATA, _AFTER_BOUNDARY, _END = range(5)


def _bad_multipart(why: str) -> BadRequest:
    return BadRequest(f"malformed multipart body: {why}", code="bad_multipart")


class MultipartParser:
    """
    ``multipart/form-data``: a part without ``filename`` is a text field,
    reported when its closing boundary is seen; a part with one is a file,
    whose data goes to the sink as it arrives.
    """

    __slots__ = ("sink", "max_fields", "max_field_bytes", "max_header_bytes", "_state", "_buf",
                 "_delim", "_first", "_count", "_part", "_text", "_charset")

    def __init__(self, sink: FieldSink, boundary: str, *, charset: str | None = None,
                 max_fields: int = 1000, max_field_bytes: int = 2**20,
                 max_header_bytes: int = 8192) -> None:
        if not boundary or len(boundary) > 70:
            raise _bad_multipart("missing or invalid boundary in Content-Type")
        self.sink = sink
        self.max_fields = max_fields
        self.max_field_bytes = max_field_bytes
        self.max_header_bytes = max_header_bytes
        self._charset = charset
        b = boundary.encode("latin-1")
        self._first = b"--" + b
        self._delim = b"\r\n--" + b
        self._state = _PREAMBLE
        self._buf = bytearray()
        self._count = 0
        # (name, is_file, decoder) of the part being read
        self._part: tuple[str, bool, Callable[[bytes], str] | None] | None = None
        self._text = bytearray()

    def feed(self, data: bytes) -> None:
        if self._state == _END:
            return
        self._buf += data
        while self._step():
            pass

    def close(self) -> None:
        if self._state != _END:
            raise _bad_multipart("body ended before the closing boundary")

    # -- the state machine; each step returns True when it made progress

    def _step(self) -> bool:
        buf = self._buf
        state = self._state
        if state == _DATA:
            i = buf.find(self._delim)
            if i < 0:
                keep = len(self._delim) - 1
                if len(buf) > keep:
                    n = len(buf) - keep
                    self._data(buf[:n])
                    del buf[:n]
                return False
            if i:
                self._data(buf[:i])
            del buf[:i + len(self._delim)]
            self._end_part()
            self._state = _AFTER_BOUNDARY
            return True
        if state == _AFTER_BOUNDARY:
            if len(buf) < 2:
                return False
            if buf[:2] == b"\r\n":
                del buf[:2]
                self._state = _HEADERS
                return True
            if buf[:2] == b"--":
                self._state = _END
                buf.clear()
                return False
            # Transport padding (spaces/tabs) before the CRLF is allowed.
            j = 0
            while j < len(buf) and buf[j] in b" \t":
                j += 1
            if j == len(buf):
                if j > 64:
                    raise _bad_multipart("garbage after a boundary")
                return False
            if j and buf[j:j + 2] == b"\r\n":
                del buf[:j]
                return True
            if j and len(buf) - j < 2:
                return False
            raise _bad_multipart("boundary not followed by CRLF or '--'")
        if state == _HEADERS:
            i = buf.find(b"\r\n\r\n")
            if i < 0:
                if buf[:2] == b"\r\n":
                    # A part with no headers at all.
                    raise _bad_multipart("part without Content-Disposition")
                if len(buf) > self.max_header_bytes:
                    raise _bad_multipart(f"part headers larger than {self.max_header_bytes} bytes")
                return False
            if i > self.max_header_bytes:
                raise _bad_multipart(f"part headers larger than {self.max_header_bytes} bytes")
            self._start_part(bytes(buf[:i]))
            del buf[:i + 4]
            self._state = _DATA
            return True
        if state == _PREAMBLE:
            # Browsers send no preamble; a body that does not open with
            # the boundary has the wrong one, and is refused at once.
            while buf[:2] == b"\r\n":
                del buf[:2]
            first = self._first
            if len(buf) < len(first):
                if bytes(buf) != first[:len(buf)]:
                    raise _bad_multipart("body does not start with the boundary")
                return False
            if buf[:len(first)] != first:
                raise _bad_multipart("body does not start with the boundary")
            del buf[:len(first)]
            self._state = _AFTER_BOUNDARY
            return True
        return False

    def _start_part(self, head: bytes) -> None:
        disposition = ctype = None
        for line in head.split(b"\r\n"):
            header, sep, value = line.partition(b":")
            if not sep:
                raise _bad_multipart("part header line without ':'")
            key = header.strip().lower()
            if key == b"content-disposition":
                disposition = value.strip()
            elif key == b"content-type":
                ctype = value.strip()
        if disposition is None:
            raise _bad_multipart("part without Content-Disposition")
        kind, params = parse_content_type(disposition)
        if kind != "form-data" or "name" not in params:
            raise _bad_multipart("part is not form-data with a name")
        self._count += 1
        if self._count > self.max_fields:
            raise _too_many_fields(self.max_fields)
        name = params["name"]
        media, cparams = parse_content_type(ctype)
        if "filename" in params:
            self._part = (name, True, None)
            self.sink.file_start(name, params["filename"], media or "application/octet-stream")
        else:
            self._part = (name, False, text_decoder(cparams.get("charset") or self._charset))
            self._text.clear()

    def _data(self, chunk: bytearray | bytes) -> None:
        part = self._part
        if part is None:
            return
        if part[1]:
            self.sink.file_data(bytes(chunk))
            return
        if len(self._text) + len(chunk) > self.max_field_bytes:
            raise _field_too_large(self.max_field_bytes)
        self._text += chunk

    def _end_part(self) -> None:
        part, self._part = self._part, None
        if part is None:
            return
        name, is_file, decode = part
        if is_file:
            self.sink.file_end()
        else:
            assert decode is not None  # a text part has its decoder
            value = decode(bytes(self._text))
            self._text.clear()
            self.sink.field(name, value)


# ---------------------------------------------------------------------------
# application/json and everything else


_JSON_WS = b" \t\r\n"
_IN_STRING = re.compile(rb'["\\]')
_OUTSIDE = re.compile(rb'["{}\[\],]')


def _invalid_json(why: str) -> BadRequest:
    return BadRequest(f"invalid JSON: {why}", code="invalid_json")


def _no_constant(name: str) -> NoReturn:
    raise _invalid_json(f"{name} is not a JSON number")


def decode_json(text: str | bytes, where: str = "") -> JSON:
    """
    ``json.loads`` that turns everything the decoder cannot take into a
    400 ``invalid_json``: syntax errors, ``NaN``/``Infinity`` (not JSON),
    nesting deeper than the interpreter's recursion allows, and integers
    longer than Python converts.
    """
    try:
        return json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise _invalid_json(f"{e.msg}{where or f' at line {e.lineno} column {e.colno}'}") from None
    except RecursionError:
        raise _invalid_json(f"nested too deeply{where}") from None
    except UnicodeDecodeError:
        raise _invalid_json(f"not UTF-8 text{where}") from None
    except ValueError:
        # int() refusing thousands of digits, and the like.
        raise _invalid_json(f"a number too long to read{where}") from None


class JSONParser:
    """
    ``application/json`` (UTF-8 only).  A top-level object is parsed member
    by member: each ``"name": value`` becomes a field as soon as the ``,``
    or ``}`` after it arrives.  Any other top-level value is one field: it
    is held (at most ``max_field_bytes``, else 413 ``field_too_large``) and
    decoded at the end of the body; the items of a top-level array count
    as fields (more than ``max_fields``: 413 ``too_many_fields`` as soon as
    the comma after the last allowed one arrives).  ``value`` is the whole
    decoded document at the end.
    """

    __slots__ = ("sink", "max_fields", "max_field_bytes", "value", "_decode", "_mode", "_buf",
                 "_pos", "_depth", "_in_string", "_count", "_members", "_chunks", "_held",
                 "_escape")

    def __init__(self, sink: FieldSink, *, charset: str | None = None, max_fields: int = 1000,
                 max_field_bytes: int = 2**20, **_: object) -> None:
        if charset and charset.lower().replace("_", "-") not in ("utf-8", "utf8"):
            raise BadRequest(f"JSON must be UTF-8, not {charset!r}", code="unsupported_charset",
                             details={"charset": charset})
        self.sink = sink
        self.max_fields = max_fields
        self.max_field_bytes = max_field_bytes
        self.value: JSON = None
        self._decode = text_decoder("utf-8")
        self._mode = "start"        # start | object | end | whole
        self._buf = bytearray()     # object: the member being read
        self._pos = 0               # how far _buf has been scanned
        self._depth = 0
        self._in_string = False
        self._count = 0
        self._members: dict[str, JSON] = {}
        self._chunks: list[bytes] = []
        self._held = 0              # whole: bytes in _chunks
        self._escape = False        # whole: a backslash ended the last chunk

    def feed(self, data: bytes) -> None:
        mode = self._mode
        if mode == "start":
            data = data.lstrip(_JSON_WS)
            if not self._chunks and data[:3] == codecs.BOM_UTF8:
                data = data[3:].lstrip(_JSON_WS)
            if not data:
                return
            if data[:1] == b"{":
                self._mode = "object"
                data = data[1:]
            else:
                self._mode = "whole"
            mode = self._mode
        if mode == "whole":
            self._held += len(data)
            if self._held > self.max_field_bytes:
                raise _field_too_large(self.max_field_bytes)
            self._count_items(data)
            self._chunks.append(data)
            return
        if mode == "end":
            if data.strip(_JSON_WS):
                raise _invalid_json("data after the top-level object")
            return
        self._buf += data
        self._scan()

    def _scan(self) -> None:
        buf = self._buf
        pos = self._pos
        while True:
            if self._in_string:
                m = _IN_STRING.search(buf, pos)
                if m is None:
                    pos = len(buf)
                    break
                if m.group() == b"\\":
                    if m.end() >= len(buf):
                        pos = m.start()  # the escaped byte is not here yet
                        break
                    pos = m.end() + 1
                    continue
                self._in_string = False
                pos = m.end()
                continue
            m = _OUTSIDE.search(buf, pos)
            if m is None:
                pos = len(buf)
                break
            c = m.group()
            pos = m.end()
            if c == b'"':
                self._in_string = True
            elif c in b"{[":
                self._depth += 1
            elif self._depth:
                if c in b"}]":
                    self._depth -= 1
            elif c == b",":
                self._member(bytes(buf[:pos - 1]), last=False)
                del buf[:pos]
                pos = 0
            elif c == b"}":
                self._member(bytes(buf[:pos - 1]), last=True)
                rest = bytes(buf[pos:])
                buf.clear()
                self._pos = 0
                self._mode = "end"
                if rest.strip(_JSON_WS):
                    raise _invalid_json("data after the top-level object")
                return
            else:
                raise _invalid_json(f"unexpected {c.decode()!r} in the top-level object")
        if len(buf) > self.max_field_bytes:
            raise _field_too_large(self.max_field_bytes)
        self._pos = pos

    def _count_items(self, data: bytes) -> None:
        """
        Count the items of a top-level array as they arrive (commas at
        depth 1, outside strings); a top-level scalar has none.
        """
        pos, n = 0, len(data)
        while pos < n:
            if self._in_string:
                if self._escape:
                    self._escape = False
                    pos += 1
                    continue
                m = _IN_STRING.search(data, pos)
                if m is None:
                    return
                pos = m.end()
                if m.group() == b"\\":
                    self._escape = True
                else:
                    self._in_string = False
                continue
            m = _OUTSIDE.search(data, pos)
            if m is None:
                return
            c = m.group()
            pos = m.end()
            if c == b'"':
                self._in_string = True
            elif c in b"{[":
                self._depth += 1
            elif c in b"}]":
                self._depth -= 1
            elif c == b"," and self._depth == 1:
                self._count += 1
                # n commas: n + 1 items.
                if self._count + 1 > self.max_fields:
                    raise _too_many_fields(self.max_fields)

    def _member(self, raw: bytes, last: bool) -> None:
        if not raw.strip(_JSON_WS):
            if last and self._count == 0:
                return  # {}
            raise _invalid_json("empty member in the top-level object")
        if len(raw) > self.max_field_bytes:
            raise _field_too_large(self.max_field_bytes)
        self._count += 1
        if self._count > self.max_fields:
            raise _too_many_fields(self.max_fields)
        member = decode_json("{" + self._decode(raw) + "}", f" in member {self._count}")
        if not isinstance(member, dict):
            raise _invalid_json(f"member {self._count} is not one name: value pair")
        if len(member) != 1:
            raise _invalid_json(f"member {self._count} is not one name: value pair")
        (name, value), = member.items()
        self._members[name] = value
        self.sink.field(name, value)

    def close(self) -> None:
        if self._mode == "whole":
            raw = b"".join(self._chunks)
            self._chunks = []
            self.value = decode_json(self._decode(raw))
            return
        if self._mode == "start":
            raise _invalid_json("empty body")
        if self._mode == "object":
            raise _invalid_json("body ended inside the top-level object")
        self.value = self._members


class RawParser:
    """
    Any other media type: no fields; the raw body stays available.
    """

    __slots__ = ()

    def __init__(self, sink: FieldSink, **_: object) -> None:
        pass

    def feed(self, data: bytes) -> None:
        pass

    def close(self) -> None:
        pass


#: What make_parser gives: one of the parsers, each with ``feed`` and ``close``.
Parser: TypeAlias = "FormParser | MultipartParser | JSONParser | RawParser"


def make_parser(content_type: bytes | None, sink: FieldSink, *, max_fields: int,
                max_field_bytes: int, max_part_header_bytes: int) -> tuple[str, Parser]:
    """
    ``(kind, parser)`` for a request's Content-Type; raises a 400 at once
    for a multipart type without a boundary or an unknown charset, so the
    request is refused before its body is read.
    """
    media, params = parse_content_type(content_type)
    charset = params.get("charset")
    limits = {"max_fields": max_fields, "max_field_bytes": max_field_bytes}
    if media == "application/x-www-form-urlencoded":
        return "form", FormParser(sink, charset=charset, **limits)
    if media == "multipart/form-data":
        return "multipart", MultipartParser(sink, params.get("boundary", ""), charset=charset,
                                            max_header_bytes=max_part_header_bytes, **limits)
    if media == "application/json" or media.endswith("+json"):
        return "json", JSONParser(sink, charset=charset, **limits)
    return "raw", RawParser(sink)

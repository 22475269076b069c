"""
Unit tests of the one query-string parser (``pipecomet._query``).
"""

from __future__ import annotations

from urllib.parse import parse_qs

from twisted.trial.unittest import SynchronousTestCase

from pipecomet._query import parse_query, parse_query_text


class QueryTests(SynchronousTestCase):
    CASES = [b"/p", b"/p?", b"/p?a=1", b"/p?a=1&a=2&b=", b"/p?a&&b=x=y", b"/p?q=a+b%20c",
             b"/p?%61=%2B"]

    def test_same_rules_as_the_stdlib(self):
        for uri in self.CASES:
            qs = uri.partition(b"?")[2].decode("ascii")
            expected = parse_qs(qs, keep_blank_values=True)
            self.assertEqual(parse_query_text(uri), expected, uri)
            self.assertEqual(parse_query(uri),
                             {k.encode(): [v.encode() for v in vs] for k, vs in expected.items()},
                             uri)

    def test_utf8_raw_and_encoded_and_bad_bytes(self):
        self.assertEqual(parse_query_text("/p?q=中&r=%E4%B8%AD".encode()),
                         {"q": ["中"], "r": ["中"]})
        self.assertEqual(parse_query(b"/p?r=%E4%B8%AD"), {b"r": ["中".encode()]})
        self.assertEqual(parse_query_text(b"/p?bad=%FF&ok=1"), {"bad": ["\ufffd"], "ok": ["1"]})

    def test_keys_equal_once_decoded_are_merged(self):
        self.assertEqual(parse_query_text(b"/p?%FF=1&%FE=2"), {"\ufffd": ["1", "2"]})

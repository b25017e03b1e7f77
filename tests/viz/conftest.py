"""Shared helper for the viz tests: an HTML checker."""

from html.parser import HTMLParser

import pytest


class HtmlDocument(HTMLParser):
    """Parses HTML, checks that every tag is closed in order, and collects script bodies,
    external URLs (src/href) and table cell texts."""

    VOID = {"meta", "br", "img", "hr", "input", "link", "source", "area", "base", "col", "embed", "wbr"}

    def __init__(self, text: str):
        super().__init__()
        self.stack, self.problems, self.external, self.scripts, self.cells = [], [], [], [], []
        self.doctype = None
        self.feed(text)
        self.close()
        assert not self.problems and not self.stack, (self.problems[:5], self.stack[:5])

    def handle_decl(self, decl):
        self.doctype = decl

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name in ("src", "href") and value and not value.startswith("#"):
                self.external.append(value)
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.problems.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        if self.stack and self.stack[-1] == "script":
            self.scripts.append(data)
        if self.stack and self.stack[-1] in ("td", "th"):
            self.cells.append(data)


@pytest.fixture
def parse_html():
    return HtmlDocument

#!/usr/bin/env python3
"""The public API of the imgcache crate, one line per item and member, read
from the HTML that `cargo doc --no-deps` writes (stable rustdoc, no JSON):

    python3 .ci/public-api.py [target/doc] > api/public-api.txt

For every public item (from `all.html`): its declaration, its inherent
methods and associated items with their signatures, and the traits it
implements (but auto traits and blanket impls). `.ci/run` diffs the output
against `api/public-api.txt`, so that a change to the surface is a visible
diff in review; when the change is meant, regenerate the file.
"""
import html
import os
import re
import sys

DOC = sys.argv[1] if len(sys.argv) > 1 else "target/doc"
ROOT = os.path.join(DOC, "imgcache")


def text(fragment):
    """The HTML fragment as one line of Rust."""
    fragment = re.sub(r"<span class=\"where[^\"]*\">", " ", fragment)
    fragment = re.sub(r"<br\s*/?>", " ", fragment)
    fragment = re.sub(r"<[^>]+>", "", fragment)
    fragment = html.unescape(fragment)
    fragment = re.sub(r"\s+", " ", fragment).strip()
    # Source links and anchors rustdoc puts in headers.
    fragment = re.sub(r"^Source\s*", "", fragment)
    fragment = fragment.replace("§", "").strip()
    return fragment


def section(page, ident):
    """The part of `page` from the element with id `ident` to the next of
    the known section ids (or the end)."""
    start = page.find('id="%s"' % ident)
    if start < 0:
        return ""
    ends = [
        page.find('id="%s"' % other, start + 1)
        for other in (
            "implementations-list",
            "trait-implementations",
            "trait-implementations-list",
            "synthetic-implementations",
            "synthetic-implementations-list",
            "blanket-implementations",
            "blanket-implementations-list",
            "required-methods",
            "provided-methods",
            "required-associated-types",
            "required-associated-consts",
            "provided-associated-consts",
            "object-safety",
            "dyn-compatibility",
            "implementors",
            "foreign-impls",
        )
    ]
    ends = [e for e in ends if e > start]
    return page[start : min(ends) if ends else len(page)]


def items():
    page = open(os.path.join(ROOT, "all.html"), encoding="utf-8").read()
    for href, name in re.findall(r'<li><a href="([^"]+\.html)">([^<]+)</a></li>', page):
        kind = os.path.basename(href).split(".")[0]
        module = os.path.dirname(href).replace("/", "::")
        path = "imgcache::" + (module + "::" if module else "") + name.split("::")[-1]
        yield kind, path, os.path.join(ROOT, href)


def main():
    out = []
    for kind, path, file in sorted(items(), key=lambda x: (x[1], x[0])):
        page = open(file, encoding="utf-8").read()
        decls = re.findall(r'<pre class="rust item-decl"><code>(.*?)</code></pre>', page, re.S)
        out.append("%s %s" % (kind, path))
        if decls:
            out.append("  " + text(decls[0]))
        members = []
        for ident in ("implementations-list", "required-methods", "provided-methods"):
            for header in re.findall(
                r'<h4 class="code-header">(.*?)</h4>', section(page, ident), re.S
            ):
                members.append("  " + text(header))
        for header in re.findall(
            r'<h3 class="code-header">(.*?)</h3>', section(page, "trait-implementations-list"), re.S
        ):
            members.append("  " + text(header))
        out.extend(sorted(set(members)))
    print("\n".join(out))


if __name__ == "__main__":
    main()

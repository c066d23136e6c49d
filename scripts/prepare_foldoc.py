#!/usr/bin/env python3
"""Turns Debian's dict-foldoc data (dictd format, gzip) into clean English paragraphs.

Usage: python3 scripts/prepare_foldoc.py foldoc.dict.dz data/train_data.txt

Each FOLDOC entry becomes its headword on one line followed by its prose paragraphs:
{cross references} keep their text, "{text (url)}" keeps the text, <category> tags, URLs,
e-mail addresses and "(yyyy-mm-dd)" date stamps are removed, wrapped lines are joined, and
indented tables/code blocks are dropped. Entries are separated by a blank line.
"""
import gzip
import re
import sys

LINK_WITH_URL = re.compile(r"\{([^{}]*?)\s*\(([^(){}]*)\)\s*\}")
LINK = re.compile(r"\{([^{}]*)\}")
CATEGORY = re.compile(r"<[a-zA-Z][a-zA-Z0-9 ,.&/-]*>")
EMAIL = re.compile(r"<?[\w.+-]+@[\w-]+(\.[\w-]+)+>?")
URL = re.compile(r"\(?\b(?:https?|ftp|gopher|telnet|news|mailto)://\S+\)?|\(?\bwww\.\S+\)?")
DATE = re.compile(r"^\(\d{4}-\d{2}-\d{2}\)$")
SPACES = re.compile(r"\s+")


def link_text(m):
    text, target = m.group(1).strip(), m.group(2).strip()
    # "{Reynolds paper (http://...)}" -> "Reynolds paper"; "{C (language)}" keeps both words.
    if "/" in target or "." in target or ":" in target:
        return text
    return f"{text} ({target})" if text else target


def clean_paragraph(lines):
    text = " ".join(l.strip() for l in lines)
    text = LINK_WITH_URL.sub(link_text, text)
    text = LINK.sub(lambda m: m.group(1), text)
    text = CATEGORY.sub("", text)
    text = EMAIL.sub("", text)
    text = URL.sub("", text)
    text = text.replace("()", "")
    text = SPACES.sub(" ", text).strip()
    text = re.sub(r"\s+([.,;:])", r"\1", text)
    return text


def entries(raw):
    head, body = [], []
    for line in raw.splitlines():
        if line and not line[0].isspace():
            if body:
                yield head, body
                head, body = [], []
            head.append(line.strip())
        else:
            body.append(line)
    if body:
        yield head, body


def paragraphs(body):
    block = []
    for line in body + [""]:
        if line.strip():
            block.append(line)
            continue
        if block:
            # Prose is indented by exactly 3 spaces; deeper indentation is a table or code.
            if all(len(l) - len(l.lstrip()) == 3 for l in block):
                p = clean_paragraph(block)
                if p and not DATE.match(p) and len(p) > 1:
                    yield p
            block = []


def main():
    src, dst = sys.argv[1], sys.argv[2]
    raw = gzip.open(src, "rt", encoding="utf-8", errors="replace").read()
    out, n = [], 0
    for head, body in entries(raw):
        if not head or head[0].startswith("00-database"):
            continue
        paras = [p for p in paragraphs(body) if p]
        if not paras:
            continue
        out.append(head[0].split("%%%")[0].strip() + "\n" + "\n\n".join(paras))
        n += 1
    with open(dst, "w", encoding="utf-8") as f:
        f.write("\n\n".join(out) + "\n")
    print(f"{dst}: {n} entries, {sum(len(x) for x in out)} characters")


if __name__ == "__main__":
    main()

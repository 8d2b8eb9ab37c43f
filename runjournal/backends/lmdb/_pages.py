"""LMDB's file format, read without LMDB: meta pages, page headers, nodes, trees.

Enough of LMDB 0.9's on-disk layout (data version 1; ``lmdb.h`` and ``mdb.c``)
to check a ``data.mdb`` before LMDB maps it, and to walk its pages without
trusting them. Pages are read with ``pread``, never mapped, and every count,
offset and page number read from the file is checked before it is used, so a
damaged or short file gives a :class:`PageError`, never a signal. Numbers are
in the machine's byte order, as LMDB writes them.

A page starts with a 16-byte header (page number, pad, flags, and for branch
and leaf pages ``lower``/``upper``: the end of the array of 2-byte node
offsets and the start of the nodes; an overflow page has its page count
there). Pages 0 and 1 are meta pages: the magic, the format version, the map
size, the records of the free-page tree and of the main tree (root page,
depth, page and entry counts) and the last page used, as of transaction
``txnid``. LMDB reads the meta page with the larger ``txnid``.
"""

from __future__ import annotations

import os
import struct
import sys
from collections.abc import Iterator
from typing import Any, Final

import attrs

__all__ = [
    "DATA_VERSION",
    "MAGIC",
    "META_BYTES",
    "P_INVALID",
    "DbRecord",
    "Meta",
    "PageError",
    "PageFile",
    "TreeWalk",
    "free_pages_of",
    "meta_problems",
    "meta_pair_problems",
    "txnid_problems",
    "newest",
    "overflow_page_count",
    "parse_meta",
]

MAGIC: Final = 0xBEEFC0DE
DATA_VERSION: Final = 1
P_INVALID: Final = (1 << 64) - 1  # the root of an empty tree

P_BRANCH: Final = 0x01
P_LEAF: Final = 0x02
P_OVERFLOW: Final = 0x04
P_META: Final = 0x08
F_BIGDATA: Final = 0x01  # a leaf node whose value sits in overflow pages
MDB_INTEGERKEY: Final = 0x08  # the free tree's keys are native integers
VALID_DB_FLAGS: Final = 0x7E  # every flag a named or main database may carry
# The free tree's flags also keep the environment's MDB_FIXEDMAP and MDB_NOSUBDIR.
FREE_DB_FLAGS: Final = MDB_INTEGERKEY | 0x01 | 0x4000
MAX_DEPTH: Final = 32  # LMDB's cursor stack: no tree is deeper
MIN_PAGE_SIZE: Final = 512
MAX_PAGE_SIZE: Final = 65536

PAGE_HEADER_BYTES: Final = 16
_HEADER: Final = struct.Struct("=QHHHH")  # page number, pad, flags, lower, upper
_OVERFLOW_COUNT: Final = struct.Struct("=I")  # at offset 12 of an overflow page
_NODE: Final = struct.Struct("=HHHH")  # lo, hi, flags, key size
_NODE_BYTES: Final = _NODE.size
_META: Final = struct.Struct("=IIQQ")  # magic, version, fixed address, map size
_DB: Final = struct.Struct("=IHHQQQQQ")  # pad, flags, depth, branch, leaf, overflow, entries, root
_TAIL: Final = struct.Struct("=QQ")  # last page used, txnid
_PGNO: Final = struct.Struct("=Q")
META_BYTES: Final = PAGE_HEADER_BYTES + _META.size + 2 * _DB.size + _TAIL.size


class PageError(Exception):
    """A page, or the file, is not what LMDB's format requires.

    Attributes:
        page: the page number, or None for the file as a whole.
        what: what is wrong, for people.
    """

    def __init__(self, page: int | None, what: str) -> None:
        super().__init__(what if page is None else f"page {page}: {what}")
        self.page = page
        self.what = what


@attrs.frozen
class DbRecord:
    """A tree's record in a meta page (LMDB's ``MDB_db``)."""

    pad: int  # the free tree's holds the page size
    flags: int
    depth: int
    branch_pages: int
    leaf_pages: int
    overflow_pages: int
    entries: int
    root: int


@attrs.frozen
class Meta:
    """One of the two meta pages (LMDB's ``MDB_meta`` and its page header)."""

    number: int  # 0 or 1: where it was read
    page_number: int  # what its header says
    page_flags: int
    magic: int
    version: int
    address: int
    map_size: int
    free: DbRecord
    main: DbRecord
    last_page: int
    txnid: int

    @property
    def page_size(self) -> int:
        return self.free.pad


def parse_meta(raw: bytes, number: int) -> Meta:
    """The meta page ``number`` from its first :data:`META_BYTES` bytes.

    Raises:
        PageError: fewer bytes than a meta page holds.
    """
    if len(raw) < META_BYTES:
        raise PageError(number, f"meta page is cut short ({len(raw)} of {META_BYTES} bytes)")
    page_number, _, flags, _, _ = _HEADER.unpack_from(raw, 0)
    magic, version, address, map_size = _META.unpack_from(raw, PAGE_HEADER_BYTES)
    at = PAGE_HEADER_BYTES + _META.size
    free = DbRecord(*_DB.unpack_from(raw, at))
    main = DbRecord(*_DB.unpack_from(raw, at + _DB.size))
    last_page, txnid = _TAIL.unpack_from(raw, at + 2 * _DB.size)
    return Meta(
        number, page_number, flags, magic, version, address, map_size, free, main, last_page, txnid
    )


def _tree_problems(name: str, db: DbRecord, last_page: int) -> list[str]:
    if db.root == P_INVALID:
        if db.depth or db.entries or db.branch_pages or db.leaf_pages or db.overflow_pages:
            return [f"the {name} tree is empty, yet its record counts pages or entries"]
        return []
    problems = []
    if not 2 <= db.root <= last_page:
        problems.append(f"the {name} tree's root is page {db.root}, outside pages 2..{last_page}")
    if not 1 <= db.depth <= MAX_DEPTH:
        problems.append(f"the {name} tree's depth is {db.depth}")
    if db.leaf_pages < 1 or db.branch_pages < db.depth - 1:
        problems.append(
            f"the {name} tree's page counts ({db.branch_pages} branch, {db.leaf_pages} leaf) "
            f"do not fit its depth {db.depth}"
        )
    if db.branch_pages + db.leaf_pages + db.overflow_pages > last_page - 1:
        problems.append(f"the {name} tree counts more pages than the file has ({last_page + 1})")
    return problems


def meta_problems(meta: Meta) -> list[str]:
    """What is wrong with a meta page on its own (empty if it is sane)."""
    if meta.magic != MAGIC:
        return [f"no LMDB magic (0x{meta.magic:08x})"]
    if meta.version != DATA_VERSION:
        return [f"LMDB data format {meta.version}, not {DATA_VERSION}"]
    problems = []
    if meta.page_number != meta.number or not meta.page_flags & P_META:
        problems.append(
            f"its header says page {meta.page_number} with flags 0x{meta.page_flags:04x}"
        )
    size = meta.page_size
    if not MIN_PAGE_SIZE <= size <= MAX_PAGE_SIZE or size & (size - 1):
        return [*problems, f"page size {size} is not a power of two in 512..65536"]
    if meta.address:
        problems.append(f"it asks for a fixed map address 0x{meta.address:x}")
    if not meta.free.flags & MDB_INTEGERKEY or meta.free.flags & ~FREE_DB_FLAGS:
        problems.append(f"the free tree's flags are 0x{meta.free.flags:04x}")
    if meta.main.flags & ~VALID_DB_FLAGS:
        problems.append(f"the main tree's flags are 0x{meta.main.flags:04x}")
    if meta.last_page < 1:
        problems.append(f"its last page is {meta.last_page}")
    elif meta.map_size < (meta.last_page + 1) * size:
        problems.append(
            f"its map size {meta.map_size} is smaller than its {meta.last_page + 1} pages"
        )
    problems += _tree_problems("free", meta.free, meta.last_page)
    problems += _tree_problems("main", meta.main, meta.last_page)
    return problems


def meta_pair_problems(first: Meta, second: Meta) -> list[str]:
    """What is wrong with the two (each sane) meta pages together.

    Each commit writes its txnid to the meta page of its parity, so the two
    always hold consecutive txnids, the even one on page 0 (both 0 in a new
    file); any other pair means one txnid is damaged, and LMDB may read an
    older state than the last commit. (A txnid damaged by 2 keeps both
    rules: :func:`txnid_problems` catches that.)
    """
    problems = []
    if (first.txnid or second.txnid) and (first.txnid % 2, second.txnid % 2) != (0, 1):
        problems.append(
            f"meta page 0 holds transaction {first.txnid} and meta page 1 transaction "
            f"{second.txnid}: each commit writes the page of its txnid's parity"
        )
    if first.page_size != second.page_size:
        problems.append(
            f"the meta pages disagree on the page size ({first.page_size}, {second.page_size})"
        )
    if abs(first.txnid - second.txnid) > 1:
        problems.append(
            f"the meta pages hold transactions {first.txnid} and {second.txnid}, "
            "which are not consecutive: one of them is damaged"
        )
    return problems


def txnid_problems(pages: PageFile, meta: Meta) -> list[str]:
    """What is wrong with a (sane) meta page's txnid, against its free tree.

    A commit that changed anything frees the pages it copied and lists them
    in the free tree under its own txnid, so from the second commit on the
    free tree's largest key is the txnid of the meta page that points to it.

    Raises:
        PageError: a page of the free tree's right edge is damaged or missing.
    """
    if meta.txnid < 2:
        return []
    walk = TreeWalk(pages, meta.free, meta.last_page, "free", integer_keys=True)
    last = walk.last_key()
    if last == meta.txnid:
        return []
    return [
        f"meta page {meta.number} says transaction {meta.txnid}, but its free-page tree "
        f"was last written by transaction {last}: the txnid is damaged"
    ]


def root_problems(pages: PageFile, meta: Meta, free: set[int] | None) -> list[str]:
    """What is wrong with the main tree's root page, as the meta page names it.

    Its header must name it and be of the type the tree's depth asks for; and
    it must not be a free page (``free``, if known): a damaged root number can
    point to a root of an older tree, consistent and stale.

    Raises:
        PageError: the root page lies beyond the end of the file.
    """
    root = meta.main.root
    if root == P_INVALID:
        return []
    if free is not None and root in free:
        return [f"the main tree's root, page {root}, is a free page: the meta page is damaged"]
    header, _, flags, _, _ = _HEADER.unpack_from(pages.read(root), 0)
    expected = P_LEAF if meta.main.depth == 1 else P_BRANCH
    if header != root or flags != expected:
        kind = "leaf" if expected == P_LEAF else "branch"
        return [
            f"the main tree's root, page {root}, is not the {kind} page a tree of depth "
            f"{meta.main.depth} starts with: the meta page is damaged"
        ]
    return []


def newest(first: Meta, second: Meta) -> Meta:
    """The meta page LMDB reads: the one with the larger txnid (the first on a tie)."""
    return second if first.txnid < second.txnid else first


def overflow_page_count(size: int, page_size: int) -> int:
    """How many overflow pages a value of ``size`` bytes takes (LMDB's ``OVPAGES``)."""
    return (PAGE_HEADER_BYTES - 1 + size) // page_size + 1


class PageFile:
    """Reads whole pages of an open ``data.mdb`` by ``pread``, never past its end."""

    def __init__(self, fd: int, page_size: int, size: int) -> None:
        self.fd = fd
        self.page_size = page_size
        self.size = size

    @property
    def pages(self) -> int:
        """How many whole pages the file holds."""
        return self.size // self.page_size

    def read(self, number: int, count: int = 1) -> bytes:
        """Pages ``number`` .. ``number + count - 1``.

        Raises:
            PageError: they do not all lie in the file.
        """
        start, length = number * self.page_size, count * self.page_size
        if number + count > self.pages:
            raise PageError(number, f"lies beyond the end of data.mdb ({self.size} bytes)")
        data = os.pread(self.fd, length, start)
        if len(data) < length:
            raise PageError(number, f"lies beyond the end of data.mdb ({self.size} bytes)")
        return data


@attrs.define
class TreeWalk:
    """Walks one B-tree (the main or the free one) from its root, checking each page.

    :meth:`records` yields every (key, value) of the tree in key order and
    collects what is wrong in ``problems``; a page found wrong is skipped with
    everything under it. ``seen`` holds the pages of the trees walked so far
    (share it between trees): a page reached twice is a problem. If
    ``locations`` is a list, each record's place in the file is added to it:
    (key offset, key length, value offset, value length), for tools and
    tests that inspect or damage files.
    """

    pages: PageFile
    db: DbRecord
    last_page: int
    name: str
    integer_keys: bool = False
    seen: set[int] = attrs.Factory(set)
    problems: list[PageError] = attrs.Factory(list)
    branch_pages: int = 0
    leaf_pages: int = 0
    overflow_pages: int = 0
    entries: int = 0
    locations: list[tuple[int, int, int, int]] | None = None

    def records(self) -> Iterator[tuple[bytes, bytes]]:
        """Every (key, value) of the tree, in order; then checks the counts."""
        if self.db.root == P_INVALID:
            return
        # (page, level, lowest key allowed, key every key must sort below)
        stack: list[tuple[int, int, bytes | None, bytes | None]] = [(self.db.root, 0, None, None)]
        while stack:
            number, level, low, high = stack.pop()
            try:
                page = self._page(number)
                leaf = level == self.db.depth - 1
                nodes = self._nodes(number, page, leaf=leaf)
                self._check_order(number, [key for key, _, _, _ in nodes], low, high, leaf=leaf)
            except PageError as exc:
                self.problems.append(exc)
                continue
            if not leaf:
                self.branch_pages += 1
                children = []
                for i, (key, _, child, _) in enumerate(nodes):
                    child_low = low if i == 0 else key
                    child_high = nodes[i + 1][0] if i + 1 < len(nodes) else high
                    children.append((child, level + 1, child_low, child_high))
                stack.extend(reversed(children))
                continue
            self.leaf_pages += 1
            for key, flags, size, offset in nodes:
                try:
                    value = self._value(number, page, flags, size, offset)
                except PageError as exc:
                    self.problems.append(exc)
                    continue
                self.entries += 1
                if self.locations is not None:
                    self._locate(number, page, key, flags, offset, len(value))
                yield key, value
        self._check_counts()

    def _locate(
        self, number: int, page: bytes, key: bytes, flags: int, offset: int, size: int
    ) -> None:
        assert self.locations is not None
        page_size = self.pages.page_size
        value_at = number * page_size + offset
        if flags & F_BIGDATA:
            value_at = _PGNO.unpack_from(page, offset)[0] * page_size + PAGE_HEADER_BYTES
        key_at = number * page_size + offset - len(key)
        self.locations.append((key_at, len(key), value_at, size))

    def last_key(self) -> Any:
        """The tree's largest key (an int for integer keys), None if it is empty:
        the pages on its right edge only.

        Raises:
            PageError: a page on the way is damaged.
        """
        number, level = self.db.root, 0
        if number == P_INVALID:
            return None
        while True:
            leaf = level == self.db.depth - 1
            nodes = self._nodes(number, self._page(number), leaf=leaf)
            if leaf:
                return self._sort_key(number, nodes[-1][0])
            number, level = nodes[-1][2], level + 1

    def _page(self, number: int) -> bytes:
        if not 2 <= number <= self.last_page:
            raise PageError(number, f"the {self.name} tree points outside 2..{self.last_page}")
        if number in self.seen:
            raise PageError(number, f"the {self.name} tree reaches it a second time")
        self.seen.add(number)
        return self.pages.read(number)

    def _nodes(self, number: int, page: bytes, *, leaf: bool) -> list[tuple[bytes, int, int, int]]:
        header, _, flags, lower, upper = _HEADER.unpack_from(page, 0)
        expected = P_LEAF if leaf else P_BRANCH
        if not any(page):
            raise PageError(number, "is all zeros")
        if header != number:
            raise PageError(number, f"its header says page {header}")
        if flags != expected:
            raise PageError(
                number,
                f"flags 0x{flags:04x}, expected a {'leaf' if leaf else 'branch'} page "
                f"of the {self.name} tree",
            )
        size = self.pages.page_size
        if not PAGE_HEADER_BYTES < lower <= upper <= size or (lower - PAGE_HEADER_BYTES) % 2:
            raise PageError(number, f"bad node bounds (lower {lower}, upper {upper})")
        count = (lower - PAGE_HEADER_BYTES) // 2
        offsets = struct.unpack_from(f"={count}H", page, PAGE_HEADER_BYTES)
        nodes = []
        for i, offset in enumerate(offsets):
            if not upper <= offset <= size - _NODE_BYTES or offset % 2:
                raise PageError(number, f"node {i} is at offset {offset}, outside {upper}..{size}")
            lo, hi, node_flags, key_size = _NODE.unpack_from(page, offset)
            key_at = offset + _NODE_BYTES
            if key_at + key_size > size:
                raise PageError(number, f"node {i}'s key runs past the page")
            key = page[key_at : key_at + key_size]
            if leaf:
                nodes.append((key, node_flags, lo | hi << 16, key_at + key_size))
            else:
                nodes.append((key, 0, lo | hi << 16 | node_flags << 32, 0))
        return nodes

    def _check_order(
        self, number: int, keys: list[bytes], low: bytes | None, high: bytes | None, *, leaf: bool
    ) -> None:
        # A branch page's first key is a placeholder: its child's keys start at `low`.
        ordered = [self._sort_key(number, key) for key in (keys if leaf else keys[1:])]
        bounds_low = None if low is None else self._sort_key(number, low)
        bounds_high = None if high is None else self._sort_key(number, high)
        for i, key in enumerate(ordered):
            if i and key <= ordered[i - 1]:
                raise PageError(number, "its keys are out of order")
            if bounds_low is not None and key < bounds_low:
                raise PageError(number, "a key sorts before its parent's separator")
            if bounds_high is not None and key >= bounds_high:
                raise PageError(number, "a key sorts after the next separator of its parent")

    def _sort_key(self, number: int, key: bytes) -> Any:  # bytes, or int for integer keys
        if not self.integer_keys:
            return key
        if len(key) != _PGNO.size:
            raise PageError(number, f"a {len(key)}-byte key in the {self.name} tree")
        return int.from_bytes(key, sys.byteorder)

    def _value(self, number: int, page: bytes, flags: int, size: int, offset: int) -> bytes:
        if flags & ~F_BIGDATA:
            raise PageError(number, f"a node with flags 0x{flags:04x} (sub-databases are not used)")
        if not flags & F_BIGDATA:
            if offset + size > len(page):
                raise PageError(number, "a value runs past the page")
            return page[offset : offset + size]
        if offset + _PGNO.size > len(page):
            raise PageError(number, "an overflow page number runs past the page")
        (first,) = _PGNO.unpack_from(page, offset)
        count = overflow_page_count(size, self.pages.page_size)
        if first < 2 or first + count - 1 > self.last_page:
            raise PageError(
                number, f"a value's {count} overflow pages from page {first} are out of range"
            )
        taken = self.seen.intersection(range(first, first + count))
        if taken:
            raise PageError(min(taken), f"overflow pages of page {number} are used twice")
        data = self.pages.read(first, count)
        header, _, overflow_flags, _, _ = _HEADER.unpack_from(data, 0)
        (stored,) = _OVERFLOW_COUNT.unpack_from(data, 12)
        if header != first or overflow_flags != P_OVERFLOW or stored != count:
            raise PageError(
                first,
                f"not the overflow page a value of {size} bytes needs (header page {header}, "
                f"flags 0x{overflow_flags:04x}, {stored} pages)",
            )
        self.seen.update(range(first, first + count))
        self.overflow_pages += count
        return data[PAGE_HEADER_BYTES : PAGE_HEADER_BYTES + size]

    def _check_counts(self) -> None:
        if self.problems:
            return  # the pages skipped make every count disagree
        found = (self.branch_pages, self.leaf_pages, self.overflow_pages, self.entries)
        recorded = (
            self.db.branch_pages,
            self.db.leaf_pages,
            self.db.overflow_pages,
            self.db.entries,
        )
        if found != recorded:
            self.problems.append(
                PageError(
                    None,
                    f"the {self.name} tree's meta record counts {recorded[0]} branch, "
                    f"{recorded[1]} leaf and {recorded[2]} overflow pages and {recorded[3]} "
                    f"records; its pages hold {found[0]}, {found[1]}, {found[2]} and {found[3]}",
                )
            )


def free_pages_of(walk: TreeWalk, problems: list[PageError] | None = None) -> set[int]:
    """The page numbers the free tree lists (each value: a count, then that many pages).

    Args:
        walk: a walk of the free tree.
        problems: where to add what is wrong; None to raise the first.

    Raises:
        PageError: the free tree, or one of its lists, is damaged (if
            ``problems`` is None).
    """
    found: list[PageError] = []
    free: set[int] = set()
    for _, value in walk.records():
        if len(value) < _PGNO.size or len(value) % _PGNO.size:
            found.append(PageError(None, f"a free-page list of {len(value)} bytes"))
            continue
        numbers = struct.unpack(f"={len(value) // _PGNO.size}Q", value)
        if numbers[0] != len(numbers) - 1:
            found.append(
                PageError(
                    None, f"a free-page list says {numbers[0]} pages, holds {len(numbers) - 1}"
                )
            )
            continue
        outside = [number for number in numbers[1:] if not 2 <= number <= walk.last_page]
        if outside:
            found.append(PageError(None, f"the free-page list names page {outside[0]}"))
            continue
        free.update(numbers[1:])
    found = walk.problems + found
    if problems is not None:
        problems.extend(found)
    elif found:
        raise found[0]
    return free

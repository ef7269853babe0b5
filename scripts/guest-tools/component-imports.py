#!/usr/bin/env python3
"""Prints the top-level imports of a WebAssembly component, one per line.

    python3 scripts/guest-tools/component-imports.py plugin.wasm

Used by scripts/build-guest-plugins.sh to check that a Python or JavaScript plugin
imports no WASI, without installing wasm-tools: a component is a sequence of sections
(id byte, LEB128 size, contents), and its imports are in the top-level import
sections (id 10). Nested modules and components are sections too, so they are skipped
whole. See the component model's Binary.md (`import`, `importname'`, `externdesc`).
"""

import sys


class Reader:
    def __init__(self, data: bytes, pos: int = 0, end: int | None = None):
        self.data, self.pos = data, pos
        self.end = len(data) if end is None else end

    def byte(self) -> int:
        if self.pos >= self.end:
            raise ValueError(f"unexpected end of data at byte {self.pos}")
        b = self.data[self.pos]
        self.pos += 1
        return b

    def leb(self) -> int:
        """An unsigned or signed LEB128 number; only its length matters for s33."""
        result, shift = 0, 0
        while True:
            b = self.byte()
            result |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                return result

    def name(self) -> str:
        n = self.leb()
        if self.pos + n > self.end:
            raise ValueError(f"a name runs past the end of its section at byte {self.pos}")
        s = self.data[self.pos : self.pos + n].decode("utf-8")
        self.pos += n
        return s


def externdesc(r: Reader) -> None:
    kind = r.byte()
    if kind == 0x00:  # core module: 0x11 typeidx
        r.byte()
        r.leb()
    elif kind in (0x01, 0x04, 0x05):  # func, component, instance: typeidx
        r.leb()
    elif kind == 0x02:  # value: 0x00 valueidx | 0x01 valtype (s33)
        r.byte()
        r.leb()
    elif kind == 0x03:  # type: 0x00 typeidx (eq) | 0x01 (sub resource)
        if r.byte() == 0x00:
            r.leb()
    else:
        raise ValueError(f"unknown externdesc kind 0x{kind:02x} at byte {r.pos - 1}")


def imports(data: bytes) -> list[str]:
    if data[:4] != b"\0asm":
        raise ValueError("not a WebAssembly file")
    if data[4:8] == b"\x01\0\0\0":
        raise ValueError("a core module, not a component")
    if data[4:8] != b"\x0d\0\x01\0":
        raise ValueError(f"unknown component version/layer {data[4:8].hex()}")
    r, names = Reader(data, 8), []
    while r.pos < r.end:
        section, size = r.byte(), r.leb()
        start = r.pos
        if section == 10:
            s = Reader(data, start, start + size)
            for _ in range(s.leb()):
                form = s.byte()
                names.append(s.name())
                if form == 0x01:  # a version suffix follows the name
                    s.name()
                elif form != 0x00:
                    raise ValueError(f"unknown import name form 0x{form:02x} at byte {s.pos - 1}")
                externdesc(s)
        r.pos = start + size
    return names


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: component-imports.py COMPONENT.wasm", file=sys.stderr)
        return 2
    path = sys.argv[1]
    try:
        with open(path, "rb") as f:
            names = imports(f.read())
    except (OSError, ValueError, UnicodeDecodeError) as e:
        print(f"component-imports: {path}: {e}", file=sys.stderr)
        return 1
    for name in names:
        print(name)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""GSM 03.38 / 3GPP TS 23.038 default alphabet, extension table and septet packing."""

from __future__ import annotations

from collections.abc import Sequence

ESCAPE = 0x1B

# Index = septet value. 0x1B is the escape to the extension table (no character).
BASIC = (
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞ\x1bÆæßÉ"
    " !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§"
    "¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
assert len(BASIC) == 128

EXTENSION: dict[int, str] = {
    0x0A: "\x0c",  # form feed (page break)
    0x14: "^",
    0x28: "{",
    0x29: "}",
    0x2F: "\\",
    0x3C: "[",
    0x3D: "~",
    0x3E: "]",
    0x40: "|",
    0x65: "€",
}

_BASIC_INDEX = {ch: i for i, ch in enumerate(BASIC) if i != ESCAPE}
_EXT_INDEX = {ch: code for code, ch in EXTENSION.items()}


def can_encode(text: str) -> bool:
    return all(ch in _BASIC_INDEX or ch in _EXT_INDEX for ch in text)


def char_septets(ch: str) -> list[int]:
    """The septets of one character (two for extension-table characters)."""
    if ch in _BASIC_INDEX:
        return [_BASIC_INDEX[ch]]
    if ch in _EXT_INDEX:
        return [ESCAPE, _EXT_INDEX[ch]]
    raise ValueError(f"character U+{ord(ch):04X} is not in the GSM 7-bit alphabet")


def encode(text: str) -> list[int]:
    out: list[int] = []
    for ch in text:
        out.extend(char_septets(ch))
    return out


def decode(septets: list[int]) -> str:
    out: list[str] = []
    escaped = False
    for s in septets:
        if escaped:
            # Unknown extension codes show the basic character (23.038 §6.2.1.1).
            out.append(EXTENSION.get(s, BASIC[s] if s != ESCAPE else " "))
            escaped = False
        elif s == ESCAPE:
            escaped = True
        else:
            out.append(BASIC[s])
    return "".join(out)


def pack(septets: Sequence[int], fill_bits: int = 0) -> bytes:
    """Pack septets LSB first after ``fill_bits`` zero bits (used after a UDH)."""
    value = 0
    bit = fill_bits
    for s in septets:
        value |= (s & 0x7F) << bit
        bit += 7
    return value.to_bytes((bit + 7) // 8, "little")


def unpack(data: bytes, count: int, fill_bits: int = 0) -> list[int]:
    value = int.from_bytes(data, "little")
    available = max(0, (len(data) * 8 - fill_bits) // 7)
    return [(value >> (fill_bits + 7 * i)) & 0x7F for i in range(min(count, available))]

"""Sizes in bytes as people write and read them: "500M", "10G" (powers of 1024) in, "10.0 GiB"
out. One place for both, used by the daemon's --max-upload-size, eke-users' --quota-bytes and
the server's quota messages."""

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text):
    """Bytes from "1234", "500K", "1.5G", "10GiB", "2TB" (K, M, G, T are powers of 1024; case
    and a trailing B or iB do not matter); ValueError saying what is wrong."""
    plain = text.strip().upper().removesuffix("B").removesuffix("I")
    number, unit = (plain[:-1], plain[-1]) if plain and plain[-1] in _UNITS else (plain, "")
    try:
        value = int(float(number) * _UNITS[unit])
    except (ValueError, OverflowError):  # OverflowError: inf
        raise ValueError(f"not a size (e.g. 500M, 10G): {text!r}") from None
    if value < 0:
        raise ValueError(f"must not be negative: {text!r}")
    return value


def human_size(count):
    """Bytes in binary units (KiB = 1024): "512 B", "9.5 GiB"."""
    if count < 1024:
        return f"{count:.0f} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        count /= 1024
        if count < 1024 or unit == "TiB":
            return f"{count:.1f} {unit}"
    raise AssertionError("unreachable")

"""Uploaded images, checked before any model work and with memory bounded while checking.

Every way an upload can be bad gets its own 4xx naming the field: not an image, a format the
models cannot take, a file over the size limit (413), a header that claims more pixels than the
limit (a decompression bomb: a few KB of PNG that would inflate to gigabytes), a truncated or
corrupt file, a mask without alpha or of another size than the image. The order matters for
memory: the byte size is checked before anything is parsed, the pixel count is read from the
header (``Image.open`` is lazy) before ``load()`` decodes a single pixel.

Decoding is CPU work: :func:`read_image` is meant to run in a thread (``asyncio.to_thread``).
"""

from __future__ import annotations

import base64
import binascii
import io
import struct
import warnings
from dataclasses import dataclass

from diffserve.server.errors import BodyTooLarge, InvalidRequest

#: Formats the spec accepts for ``image`` (png, webp, jpg), by their first bytes.
_MAGIC = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG"}


@dataclass(frozen=True)
class UploadLimits:
    """Bounds on what one edit request may upload (``diffserve serve`` flags set them)."""

    max_body_bytes: int = 32 * 2**20  # the whole request, all images together
    max_image_bytes: int = 25 * 2**20  # one file (the spec allows 50 MB; a server may set less)
    max_images: int = 16  # the spec's maximum
    max_pixels: int = 4096 * 4096  # per image, read from the header before decoding


def sniff_format(data: bytes) -> str | None:
    """PNG, JPEG or WEBP from the file's first bytes, else None (the name and type a client sends prove nothing)."""
    for magic, name in _MAGIC.items():
        if data.startswith(magic):
            return name
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def read_image(data: bytes, param: str, limits: UploadLimits, *, formats: tuple[str, ...] = ("PNG", "JPEG", "WEBP")):
    """A decoded PIL image from ``data``, or a precise 4xx naming ``param``."""
    from PIL import Image

    if not data:
        raise InvalidRequest(f"{param} is an empty file", param=param)
    if len(data) > limits.max_image_bytes:
        raise BodyTooLarge(f"{param} is {len(data)} bytes; the limit per image is {limits.max_image_bytes}", param=param)
    kind = sniff_format(data)
    allowed = " or ".join(f.lower() for f in formats)
    if kind is None:
        raise InvalidRequest(f"{param} is not a {allowed} image (its first bytes are {data[:8].hex()})", param=param)
    if kind not in formats:
        raise InvalidRequest(f"{param} is a {kind.lower()} image; it must be {allowed}", param=param)
    if kind == "PNG" and data[12:16] == b"IHDR":  # the size, straight from the header, before PIL's own bomb check
        _check_pixels(*struct.unpack(">II", data[16:24]), param, limits)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the pixel limit below is ours
            img = Image.open(io.BytesIO(data))
            width, height = img.size
    except Image.DecompressionBombError as exc:
        raise InvalidRequest(f"{param} claims too many pixels ({exc}); the limit is {limits.max_pixels}", param=param) from None
    except Exception as exc:  # noqa: BLE001 - any failure to read the header is the upload's fault
        raise InvalidRequest(f"{param} is not a readable {kind.lower()} image: {_first_line(exc)}", param=param) from None
    _check_pixels(width, height, param, limits)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.load()
    except Exception as exc:  # noqa: BLE001 - truncated or corrupt data raises OSError, SyntaxError, ValueError ...
        raise InvalidRequest(f"{param} is a truncated or corrupt {kind.lower()} image: {_first_line(exc)}", param=param) from None
    return img


def _check_pixels(width: int, height: int, param: str, limits: UploadLimits) -> None:
    if width < 1 or height < 1 or width * height > limits.max_pixels:
        raise InvalidRequest(
            f"{param} is {width}x{height} pixels ({width * height}); the limit is {limits.max_pixels} pixels per image",
            param=param,
        )


def read_mask(data: bytes, limits: UploadLimits, image_size: tuple[int, int]):
    """The spec's mask: a PNG with alpha, the first image's size; returned as an in-painting mask
    (mode ``L``, white where the mask is fully transparent: the area to repaint)."""
    mask = read_image(data, "mask", limits, formats=("PNG",))
    has_alpha = "A" in mask.getbands() or (mask.mode == "P" and "transparency" in mask.info)
    if not has_alpha:
        raise InvalidRequest(
            f"mask must be a PNG with an alpha channel (fully transparent where the image is to be edited); it has mode {mask.mode}",
            param="mask",
        )
    if mask.size != image_size:
        raise InvalidRequest(
            f"mask is {mask.size[0]}x{mask.size[1]} but the first image is {image_size[0]}x{image_size[1]}; they must be the same size",
            param="mask",
        )
    alpha = mask.convert("RGBA").getchannel("A")
    return alpha.point(lambda a: 255 if a == 0 else 0).convert("L")


def to_png(img, size: tuple[int, int], *, mask: bool = False) -> bytes:
    """``img`` at ``size`` as PNG bytes: RGB for an input image, L (nearest-neighbour) for a mask."""
    from PIL import Image

    img = img.convert("L" if mask else "RGB")
    if img.size != size:
        img = img.resize(size, Image.NEAREST if mask else Image.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def decode_data_url(url: object, param: str, limits: UploadLimits) -> bytes:
    """The bytes of a ``data:`` URL (the JSON form's ``image_url``); any other URL is refused,
    because this server fetches nothing from the network."""
    if not isinstance(url, str):
        raise InvalidRequest(f"{param} must be a string (a data: URL), got {type(url).__name__}", param=param)
    if not url.startswith("data:"):
        scheme = url.split(":", 1)[0][:16] if ":" in url else "no scheme"
        raise InvalidRequest(
            f"{param} is a {scheme!r} URL; this server fetches nothing from the network: send the image inline "
            "as a data: URL (data:image/png;base64,...) or upload it as multipart/form-data",
            param=param,
        )
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise InvalidRequest(f"{param} must be a base64 data: URL (data:image/png;base64,...)", param=param)
    if len(payload) * 3 // 4 > limits.max_image_bytes:
        raise BodyTooLarge(f"{param} holds about {len(payload) * 3 // 4} bytes; the limit per image is {limits.max_image_bytes}", param=param)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{param} is not valid base64 after 'data:...;base64,'", param=param) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__

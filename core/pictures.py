"""Pictures, drawn with PIL: image grids (training previews, the report), grids side by side and two-colour
scatter plots. Every picture is written here, atomically."""
from __future__ import annotations

import io
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from core.artifacts import atomic_path
from core.data import to_uint8

BACKGROUND = (255, 255, 255)
INK = (30, 30, 30)
COLOURS = ((31, 119, 180), (255, 127, 14))  # blue: real, orange: generated


def save_picture(image: Image.Image, path: Path, fmt: str = "png") -> None:
    """A PIL image as a PNG (or a JPEG, quality 95), written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_bytes(picture_bytes(image, fmt))


def picture_bytes(image: Image.Image, fmt: str = "png") -> bytes:
    """The bytes of a PIL image's PNG (or JPEG, quality 95) file."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG" if fmt == "png" else "JPEG", quality=95)
    return buffer.getvalue()


def to_picture(image: torch.Tensor) -> Image.Image:
    """One image (C, H, W), uint8 or float in [-1, 1], as a PIL image (L or RGB)."""
    array = image if image.dtype == torch.uint8 else to_uint8(image)
    return Image.fromarray(array[0].numpy() if array.shape[0] == 1 else array.permute(1, 2, 0).numpy())


def tile(images: torch.Tensor, columns: int, fill: int) -> torch.Tensor:
    """uint8 images (N, C, H, W) as one uint8 picture (C, rows*(H+2), columns*(W+2)), each image framed by
    a 1-pixel border of `fill`."""
    n, c, h, w = images.shape
    rows = max(1, (n + columns - 1) // columns)
    grid = torch.full((c, rows * (h + 2), columns * (w + 2)), fill, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, columns)
        grid[:, r * (h + 2) + 1: r * (h + 2) + 1 + h, col * (w + 2) + 1: col * (w + 2) + 1 + w] = images[i]
    return grid


def save_image_grid(images: torch.Tensor, path: str | Path, columns: int = 8) -> None:
    """Float images in [-1, 1] (or uint8), shape (N, C, H, W), as one PNG grid on black."""
    images = images if images.dtype == torch.uint8 else to_uint8(images)
    save_picture(to_picture(tile(images, columns, fill=0)), Path(path))


def grid_image(images: torch.Tensor, columns: int = 8, scale: int = 1) -> Image.Image:
    """uint8 images (N, C, H, W) as one RGB picture on white, 2 pixels apart."""
    canvas = to_picture(tile(images, columns, fill=255)).convert("RGB")
    if scale > 1:
        canvas = canvas.resize((canvas.width * scale, canvas.height * scale), Image.Resampling.NEAREST)
    return canvas


def _scale_for(images: torch.Tensor) -> int:
    return max(1, 64 // images.shape[-1])  # small images are drawn at least 64 pixels wide


def side_by_side(real: torch.Tensor, generated: torch.Tensor, path: Path) -> None:
    """Two titled grids in one PNG: real on the left, generated on the right."""
    scale = _scale_for(real)
    left, right = grid_image(real, scale=scale), grid_image(generated, scale=scale)
    title, gap = 20, 16
    canvas = Image.new("RGB", (left.width + gap + right.width, title + max(left.height, right.height)), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 4), f"real held-out ({len(real)})", fill=INK)
    draw.text((left.width + gap + 4, 4), f"generated ({len(generated)})", fill=INK)
    canvas.paste(left, (0, title))
    canvas.paste(right, (left.width + gap, title))
    save_picture(canvas, path)


def pairs_grid(top: torch.Tensor, bottom: torch.Tensor, path: Path) -> None:
    """Two rows: `top` images above their partners in `bottom`."""
    both = torch.cat([top, bottom])
    save_picture(grid_image(both, columns=max(1, len(top)), scale=_scale_for(both)), path)


def scatter(a: torch.Tensor, b: torch.Tensor, legend: tuple[str, str], title: str, path: Path,
            size: int = 560) -> None:
    """Points a (N, 2) in blue and b (M, 2) in orange, with a title and a legend."""
    margin, top = 24, 40
    canvas = Image.new("RGB", (size, size + top - margin), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    points = torch.cat([a, b]).double()
    low, high = points.min(0).values, points.max(0).values
    span = (high - low).clamp_min(1e-12)
    inner = size - 2 * margin

    def place(p: torch.Tensor) -> torch.Tensor:
        xy = (p.double() - low) / span * inner
        return torch.stack([margin + xy[:, 0], top + inner - xy[:, 1]], 1)

    # the larger set first so that the smaller one stays visible on top
    layers = sorted(((a, COLOURS[0]), (b, COLOURS[1])), key=lambda layer: -len(layer[0]))
    for set_points, colour in layers:
        for x, y in place(set_points).tolist():
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
    draw.rectangle((margin, top, margin + inner, top + inner), outline=(200, 200, 200))
    draw.text((margin, 8), title, fill=INK)
    for i, (label, colour) in enumerate(zip(legend, COLOURS)):
        x, y = size - margin - 150, 6 + 14 * i
        draw.ellipse((x, y + 2, x + 8, y + 10), fill=colour)
        draw.text((x + 14, y), f"{label} ({len(a) if i == 0 else len(b)})", fill=INK)
    save_picture(canvas, path)

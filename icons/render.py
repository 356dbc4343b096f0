#!/usr/bin/env python3
"""Draws touchgate's icons as SVG and renders them to PNG with rsvg-convert.

  app.svg / app-1024.png        the app icon (the bundler's sizes come from it: see README)
  tray/<state>-<panel>.svg/.png  tray icons, one per state, for light and dark panels

The tray glyph is a security key seen from above: a body with a round touch pad. The pad's
colour and mark say the state; the body is dark on light panels and light on dark ones.
"""
import pathlib
import subprocess

HERE = pathlib.Path(__file__).resolve().parent

STATES = {
    # state: (pad fill, pad mark)
    "signed-out": (None, ""),
    "waiting": ("#f59e0b", "ring"),
    "connected": ("#16a34a", "check"),
    "reconnecting": ("#3b82f6", "arc"),
    "error": ("#dc2626", "bang"),
}
PANELS = {"light": "#1f2937", "dark": "#f3f4f6"}


def key_glyph(body: str, pad: str | None, mark: str, scale: float = 1.0) -> str:
    """The key on a 64-unit grid."""
    pad_fill = pad or "none"
    pad_stroke = body if pad is None else pad
    marks = {
        "": "",
        "ring": f'<circle cx="32" cy="38" r="15" fill="none" stroke="{pad}" stroke-width="3" opacity="0.55"/>',
        "check": '<path d="M24.5 38.5 l5 5 l10 -11" fill="none" stroke="#ffffff" stroke-width="4" stroke-linecap="round" stroke-linejoin="round"/>',
        "arc": '<path d="M25 38 a7 7 0 1 1 7 7" fill="none" stroke="#ffffff" stroke-width="3.5" stroke-linecap="round"/><path d="M30 45 l3 -3 l0 6 z" fill="#ffffff"/>',
        "bang": '<rect x="30" y="29" width="4" height="10" rx="2" fill="#ffffff"/><circle cx="32" cy="44" r="2.3" fill="#ffffff"/>',
    }
    return (
        f'<g transform="scale({scale})">'
        # key ring hole and body
        f'<rect x="22" y="2" width="20" height="13" rx="2" fill="{body}"/>'
        f'<rect x="13" y="14" width="38" height="48" rx="11" fill="none" stroke="{body}" stroke-width="4.5"/>'
        f'<circle cx="32" cy="38" r="10.5" fill="{pad_fill}" stroke="{pad_stroke}" stroke-width="3.5"/>'
        f'{marks[mark]}'
        "</g>"
    )


def svg(size: int, inner: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{size}" height="{size}" '
        f'viewBox="0 0 {size} {size}">{inner}</svg>\n'
    )


def render(svg_path: pathlib.Path, png_path: pathlib.Path, size: int) -> None:
    subprocess.run(
        ["rsvg-convert", "-w", str(size), "-h", str(size), "-o", str(png_path), str(svg_path)],
        check=True,
    )


def main() -> None:
    tray = HERE / "tray"
    tray.mkdir(exist_ok=True)
    for state, (pad, mark) in STATES.items():
        for panel, body in PANELS.items():
            path = tray / f"{state}-{panel}.svg"
            path.write_text(svg(64, key_glyph(body, pad, mark)))
            render(path, path.with_suffix(".png"), 64)
    # The app icon: the connected key, white on a blue tile.
    tile = (
        '<defs><linearGradient id="g" x1="0" y1="0" x2="0" y2="1">'
        '<stop offset="0" stop-color="#2563eb"/><stop offset="1" stop-color="#1e3a8a"/>'
        "</linearGradient></defs>"
        '<rect x="64" y="64" width="896" height="896" rx="200" fill="url(#g)"/>'
        '<g transform="translate(224 176)">' + key_glyph("#ffffff", "#f5b83d", "", 9.0) + "</g>"
    )
    app = HERE / "app.svg"
    app.write_text(svg(1024, tile))
    render(app, HERE / "app-1024.png", 1024)


if __name__ == "__main__":
    main()

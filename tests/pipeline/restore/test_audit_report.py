"""The audit report opens in headless Chromium: a non-blank screenshot, no console errors, no failed
loads, every embedded image decoded; the PNG plots sit beside ``report.html``.

Chromium missing is a FAILURE with the install command, never a skip (``apt-get install -y chromium``;
the Makefile installs it).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.pipeline.restore.chromium_cdp import INSTALL_HINT, find_chromium, inspect_page
from tests.pipeline.restore.conftest import AuditRun


def test_chromium_is_installed() -> None:
    if find_chromium() is None:
        pytest.fail(f"Chromium is required for the report rendering test and is not installed: run `{INSTALL_HINT}` "
                    "(Debian package `chromium`).", pytrace=False)


def test_report_renders_in_headless_chromium(audit_without_weights: AuditRun, tmp_path: Path) -> None:
    if find_chromium() is None:
        pytest.fail(f"Chromium is not installed: run `{INSTALL_HINT}`", pytrace=False)
    out = audit_without_weights.output
    summary = audit_without_weights.outcome.summary
    plots = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert plots == ["hist_bpp.png", "hist_ms_ssim.png", "hist_psnr.png", "scatter_bpp_psnr.png"]
    for name in plots:
        with Image.open(out / "plots" / name) as img:
            assert img.format == "PNG" and img.width > 200 and img.height > 150

    report = inspect_page(out / "report.html")
    assert report.problems == [], report.problems
    assert report.title == f"RDEIC audit of {summary['archive']}"
    assert report.body_text_length > 500
    crops = summary["worst"]
    assert len(crops) == 4
    assert len(report.images) == len(plots) + 2 * len(crops)  # plots + original|decoded per crop
    broken = [i for i in report.images if not i["complete"] or i["w"] == 0 or i["h"] == 0]
    assert broken == []
    assert {i["alt"] for i in report.images} >= {f"original {c['key']}" for c in crops}

    shot = Image.open(io.BytesIO(report.screenshot_png))
    assert shot.format == "PNG" and shot.width >= 1000 and shot.height > 1500  # the full page, not a viewport
    pixels = np.asarray(shot.convert("RGB"), dtype=np.int16)
    assert pixels.std() > 10  # not a blank page
    colourful = np.abs(pixels[..., 0] - pixels[..., 2]) > 40
    assert colourful.mean() > 0.005  # plots and photo crops were painted
    (tmp_path / "report.png").write_bytes(report.screenshot_png)


def test_the_page_checker_sees_console_errors_exceptions_and_broken_images(tmp_path: Path) -> None:
    """The checker itself must be able to fail: a page with an error, an exception and a broken image."""
    if find_chromium() is None:
        pytest.fail(f"Chromium is not installed: run `{INSTALL_HINT}`", pytrace=False)
    page = tmp_path / "bad.html"
    page.write_text("<!DOCTYPE html><html><head><title>bad</title></head><body><p>x</p>"
                    "<img alt=broken src='data:image/png;base64,AAAA'>"
                    "<script>console.error('report broke'); undefinedFunction();</script></body></html>")
    report = inspect_page(page)
    assert any("report broke" in e for e in report.console_errors)
    assert any("undefinedFunction" in e for e in report.exceptions)
    assert [i["w"] for i in report.images] == [0]
    assert report.title == "bad" and report.screenshot_png[:8] == b"\x89PNG\r\n\x1a\n"

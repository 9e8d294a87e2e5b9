"""Open an HTML page in a real headless browser (Debian's chromium) and report what it rendered."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

# Appended to a copy of the page: after load, record every image's rendered size and the sections' ids in the DOM.
_PROBE = """<script>window.addEventListener('load', () => {
  const images = [...document.images].map(
    i => i.complete && i.naturalWidth > 0 ? i.naturalWidth + 'x' + i.naturalHeight : 'broken');
  const probe = document.createElement('pre'); probe.id = 'probe';
  const sections = [...document.querySelectorAll('section')].map(s => s.id);
  probe.textContent = 'IMAGES ' + images.join(' ') + '\\nSECTIONS ' + sections.join(' ');
  document.body.appendChild(probe);
});</script>"""


def chromium_or_none() -> str | None:
    """The browser binary, or None where none is installed (in CI's real tier it must be: the test fails)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if found is None and os.environ.get("MOEKIT_REAL_TESTS") == "1":
        pytest.fail("chromium is not installed: .ci/run installs it (apt-get install chromium)")
    return found


def chromium() -> str:
    """The browser binary; skipped where none is installed, except in CI's real tier, where it must be."""
    found = chromium_or_none()
    if found is None:
        if os.environ.get("MOEKIT_REAL_TESTS") == "1":
            pytest.fail("chromium is not installed: .ci/run installs it (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return found


def render(page: Path, work: Path) -> tuple[list[str], list[str], Path]:
    """(image sizes or 'broken', section ids, screenshot path) of ``page`` as chromium renders it."""
    browser = chromium()
    page, work = page.absolute(), work.absolute()
    probe = work / "probed.html"
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", _PROBE + "</body>"), encoding="utf-8")
    flags = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--virtual-time-budget=10000",
        f"--user-data-dir={work / 'profile'}",
    ]
    dom = subprocess.run([*flags, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    match = re.search(r"IMAGES (.*)\nSECTIONS (.*)</pre>", dom.stdout)
    assert match is not None, dom.stdout[-2000:]
    shot = work / "report.png"
    subprocess.run(
        [*flags, f"--screenshot={shot}", "--window-size=1280,6000", page.as_uri()], capture_output=True, timeout=120
    )
    return match.group(1).split(), match.group(2).split(), shot

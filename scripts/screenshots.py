"""Regenerate the README's screenshots (docs/trajectory-viewer.png, docs/demo-app.png) with the shipped
model, in headless Chromium (scripts/test-setup.sh installs it). About a minute on 2 CPU cores.

    python scripts/screenshots.py
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red circle moves right"


def browser(width: int, height: int) -> webdriver.Chrome:
    options = Options()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                 f"--window-size={width},{height}", "--proxy-server=127.0.0.1:9",
                 "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"):  # fmt: skip
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)


def save_small(driver: webdriver.Chrome, path: Path) -> None:
    """The screenshot as a 256-colour PNG (a tenth of the bytes; pages are flat colours)."""
    raw = path.with_suffix(".raw.png")
    driver.save_screenshot(str(raw))
    Image.open(raw).convert("RGB").quantize(256).save(path, optimize=True)
    raw.unlink()
    print(f"wrote {path} ({path.stat().st_size // 1024} KiB)")


def trajectory(work: Path, step: int = 9) -> None:
    page = work / "trajectory.html"
    subprocess.run([sys.executable, "-m", "univigu", "joint", PROMPT, "--seed", "0", "--device", "cpu",
                    "--out", str(work), "--trajectory", str(page)], cwd=ROOT, check=True)  # fmt: skip
    driver = browser(1100, 720)
    try:
        driver.get(page.as_uri())
        driver.execute_script("const s = document.getElementById('step'); s.value = arguments[0];"
                              "s.dispatchEvent(new Event('input'));", step - 1)  # fmt: skip
        time.sleep(0.5)
        save_small(driver, ROOT / "docs" / "trajectory-viewer.png")
    finally:
        driver.quit()


def app(work: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "univigu", "serve", "--port", str(port), "--device", "cpu",
                               "--out", str(work / "serve")], cwd=ROOT)  # fmt: skip
    driver = browser(1100, 900)
    try:
        for _ in range(120):  # the model and gradio load first
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(1)
        driver.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "button[role=tab]"))
        next(t for t in driver.find_elements(By.CSS_SELECTOR, "button[role=tab]") if t.text == "Joint").click()
        next(b for b in driver.find_elements(By.TAG_NAME, "button") if b.text == "Generate both").click()
        wait.until(lambda d: any(v.get_attribute("src") for v in d.find_elements(By.TAG_NAME, "video")))
        time.sleep(2)  # the first frames drawn
        save_small(driver, ROOT / "docs" / "demo-app.png")
    finally:
        driver.quit()
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        trajectory(Path(tmp))
        app(Path(tmp))

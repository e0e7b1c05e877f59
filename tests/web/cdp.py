"""A small headless-Chromium driver over the DevTools protocol on a pipe
(--remote-debugging-pipe: JSON messages ending in NUL on fds 3 and 4), so
the browser test needs nothing beyond Debian's chromium and Python."""
import base64
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time

import browser


def find_chromium():
    return browser.find(("chromium", "chromium-browser", "google-chrome"))


class Browser(browser.Driver):
    def __init__(self, exe=None, width=1400, height=900, extra_args=()):
        exe = exe or find_chromium()
        self.profile = tempfile.mkdtemp(prefix="ichtriage-chromium.")
        to_chrome_r, self._w = os.pipe()
        self._r, from_chrome_w = os.pipe()
        argv = [exe, "--headless=new", "--remote-debugging-pipe", "--no-sandbox",
                "--disable-gpu", "--no-first-run", "--no-default-browser-check",
                "--disable-extensions", "--disable-background-networking",
                "--autoplay-policy=no-user-gesture-required",
                "--user-data-dir=" + self.profile, "--window-size=%d,%d" % (width, height)]
        argv += list(extra_args)
        # The browser reads commands on fd 3 and writes answers on fd 4. bash,
        # not sh: dash refuses to redirect from a descriptor above 9.
        self.proc = subprocess.Popen(
            ["/bin/bash", "-c", 'exec "$@" 3<&%d 4>&%d' % (to_chrome_r, from_chrome_w), "bash"] + argv,
            pass_fds=(to_chrome_r, from_chrome_w), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._next = 0
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._answers = {}
        self.events = []  # (method, params, sessionId)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.session = None

    def _read(self):
        with os.fdopen(self._r, "rb", buffering=0) as f:
            self._pump(f)

    def _pump(self, f):
        buf = b""
        while True:
            chunk = f.read(65536)
            if not chunk:
                break
            buf += chunk
            while b"\0" in buf:
                msg, buf = buf.split(b"\0", 1)
                m = json.loads(msg)
                with self._cv:
                    if "id" in m:
                        self._answers[m["id"]] = m
                    else:
                        self.events.append((m.get("method"), m.get("params"), m.get("sessionId")))
                    self._cv.notify_all()

    def send(self, method, params=None, session=True, timeout=30):
        with self._lock:
            self._next += 1
            mid = self._next
        msg = {"id": mid, "method": method, "params": params or {}}
        if session and self.session:
            msg["sessionId"] = self.session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        with self._cv:
            while mid not in self._answers:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("no answer to %s" % method)
                self._cv.wait(left)
            m = self._answers.pop(mid)
        if "error" in m:
            raise RuntimeError("%s: %s" % (method, m["error"]))
        return m.get("result", {})

    def open(self, url):
        target = self.send("Target.createTarget", {"url": "about:blank"}, session=False)
        self.session = self.send("Target.attachToTarget",
                                 {"targetId": target["targetId"], "flatten": True},
                                 session=False)["sessionId"]
        self.send("Page.enable")
        self.send("Runtime.enable")
        self.send("Page.navigate", {"url": url})

    def eval(self, expr):
        r = self.send("Runtime.evaluate", {"expression": expr, "returnByValue": True,
                                           "awaitPromise": True})
        if "exceptionDetails" in r:
            raise RuntimeError("%s: %s" % (expr, r["exceptionDetails"]))
        return r["result"].get("value")

    def mouse(self, x, y, click):
        self.send("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": x, "y": y})
        if click:
            for t in ("mousePressed", "mouseReleased"):
                self.send("Input.dispatchMouseEvent", {"type": t, "x": x, "y": y,
                                                       "button": "left", "clickCount": 1})

    # key name -> (code, Windows virtual key code, text it types)
    KEYS = {"Tab": ("Tab", 9, ""), "Enter": ("Enter", 13, "\r"), " ": ("Space", 32, " "),
            "ArrowLeft": ("ArrowLeft", 37, ""), "ArrowUp": ("ArrowUp", 38, ""),
            "ArrowRight": ("ArrowRight", 39, ""), "ArrowDown": ("ArrowDown", 40, ""),
            "Home": ("Home", 36, ""), "End": ("End", 35, "")}

    def key(self, name):
        code, vk, text = self.KEYS[name]
        down = {"type": "keyDown" if text else "rawKeyDown", "key": name, "code": code,
                "windowsVirtualKeyCode": vk}
        if text:
            down["text"] = text
        self.send("Input.dispatchKeyEvent", down)
        self.send("Input.dispatchKeyEvent", {"type": "keyUp", "key": name, "code": code,
                                             "windowsVirtualKeyCode": vk})

    def screenshot(self, path):
        data = self.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
        with open(path, "wb") as f:
            f.write(base64.b64decode(data["data"]))

    def dialogs(self):
        return [p for m, p, _ in self.events if m == "Page.javascriptDialogOpening"]

    def console_errors(self):
        return [p for m, p, _ in self.events
                if m == "Runtime.exceptionThrown" or
                (m == "Runtime.consoleAPICalled" and p.get("type") == "error")]

    def close(self):
        try:
            self.send("Browser.close", session=False, timeout=5)
        except Exception:
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._w)
        shutil.rmtree(self.profile, ignore_errors=True)

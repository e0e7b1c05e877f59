"""A small headless-Firefox driver over WebDriver BiDi, Firefox's own remote
protocol: `firefox-esr --headless --remote-debugging-port=0` with a fresh
profile prints the websocket address it listens on; commands and events
are JSON messages on that websocket (websocket-client from Debian's
python3-websocket). Nothing beyond Debian's firefox-esr and Python."""
import base64
import collections
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time

import websocket

import browser

# Preferences on top of the ones the remote agent sets for automation:
# sound without a user gesture, as Chromium's --autoplay-policy flag does
# in cdp.py.
PREFS = {
    "media.autoplay.default": 0,
    "media.autoplay.block-webaudio": False,
}
LISTENING = re.compile(r"WebDriver BiDi listening on (ws://\S+)")


def find_firefox():
    return browser.find(("firefox-esr", "firefox"))


def value(rv):
    """The Python value of a BiDi RemoteValue (what Chromium's returnByValue
    gives): primitives, arrays as lists, objects as dicts; platform objects
    (nodes, windows) as {}."""
    t = rv.get("type")
    v = rv.get("value")
    if t in ("undefined", "null"):
        return None
    if t == "number" and isinstance(v, str):  # NaN, -0, Infinity, -Infinity
        return float(v)
    if t == "bigint":
        return int(v)
    if t in ("string", "number", "boolean", "date"):
        return v
    if t in ("array", "set"):
        return [value(x) for x in v or []]
    if t in ("object", "map"):
        return {(k if isinstance(k, str) else value(k)): value(x) for k, x in v or []}
    return {}


class Browser(browser.Driver):
    def __init__(self, exe=None, width=1400, height=900, insecure=False, start_timeout=90):
        exe = exe or find_firefox()
        self.profile = tempfile.mkdtemp(prefix="ichtriage-firefox.")
        with open(os.path.join(self.profile, "user.js"), "w") as f:
            for k, v in PREFS.items():
                f.write("user_pref(%s, %s);\n" % (json.dumps(k), json.dumps(v)))
        env = dict(os.environ, MOZ_CRASHREPORTER_DISABLE="1")
        # Its own process group: close() can end the content processes too.
        self.proc = subprocess.Popen(
            [exe, "--headless", "--no-remote", "--remote-debugging-port=0",
             "--profile", self.profile, "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env=env, start_new_session=True)
        self.log = collections.deque(maxlen=40)  # Firefox's last stderr lines
        self._url = None
        self._listening = threading.Event()
        threading.Thread(target=self._stderr, daemon=True).start()
        self.ws = None
        self.context = None
        self._next = 0
        self._cv = threading.Condition()
        self._answers = {}
        self.events = []  # (method, params)
        try:
            if not self._listening.wait(start_timeout) or not self._url:
                raise RuntimeError("firefox did not start its remote agent in %ss:\n%s"
                                   % (start_timeout, "\n".join(self.log)))
            # Firefox refuses websocket handshakes that carry an Origin.
            self.ws = websocket.create_connection(self._url + "/session", timeout=30,
                                                  suppress_origin=True)
            self.ws.settimeout(None)
            threading.Thread(target=self._read, daemon=True).start()
            self.send("session.new", {"capabilities": {"alwaysMatch": {
                "acceptInsecureCerts": bool(insecure)}}})
            self.send("session.subscribe", {"events": [
                "log.entryAdded", "browsingContext.userPromptOpened"]})
            self.context = self.send("browsingContext.getTree", {"maxDepth": 0})["contexts"][0]["context"]
            self.send("browsingContext.setViewport", {
                "context": self.context, "viewport": {"width": width, "height": height}})
        except BaseException:
            self.close()
            raise

    def _stderr(self):
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip()
            self.log.append(line)
            m = LISTENING.search(line)
            if m and not self._listening.is_set():
                self._url = m.group(1)
                self._listening.set()
        self.proc.stderr.close()
        self._listening.set()  # exited before listening: stop waiting

    def _read(self):
        while True:
            try:
                m = json.loads(self.ws.recv())
            except Exception:  # closed (by close() or by Firefox exiting)
                break
            with self._cv:
                if m.get("type") == "event":
                    self.events.append((m.get("method"), m.get("params")))
                elif "id" in m:
                    self._answers[m["id"]] = m
                self._cv.notify_all()
        with self._cv:
            self._answers[None] = {"type": "error", "error": "connection closed"}
            self._cv.notify_all()

    def send(self, method, params=None, timeout=30):
        with self._cv:
            self._next += 1
            mid = self._next
        self.ws.send(json.dumps({"id": mid, "method": method, "params": params or {}}))
        deadline = time.monotonic() + timeout
        with self._cv:
            while mid not in self._answers and None not in self._answers:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("no answer to %s" % method)
                self._cv.wait(left)
            m = self._answers.pop(mid, None) or self._answers[None]
        if m.get("type") == "error":
            raise RuntimeError("%s: %s: %s" % (method, m.get("error"), m.get("message", "")))
        return m.get("result", {})

    def open(self, url):
        self.send("browsingContext.navigate", {"context": self.context, "url": url,
                                               "wait": "interactive"})

    def eval(self, expr):
        r = self.send("script.evaluate", {"expression": expr, "target": {"context": self.context},
                                          "awaitPromise": True, "resultOwnership": "none"})
        if r.get("type") == "exception":
            d = r.get("exceptionDetails", {})
            raise RuntimeError("%s: %s" % (expr, d.get("text", d)))
        return value(r["result"])

    def mouse(self, x, y, click):
        steps = [{"type": "pointerMove", "x": int(x), "y": int(y)}]
        if click:
            steps += [{"type": "pointerDown", "button": 0}, {"type": "pointerUp", "button": 0}]
        self.send("input.performActions", {"context": self.context, "actions": [
            {"type": "pointer", "id": "mouse", "parameters": {"pointerType": "mouse"},
             "actions": steps}]})

    # key name -> WebDriver's code point for it
    KEYS = {"Tab": "\ue004", "Enter": "\ue007", " ": " ", "ArrowLeft": "\ue012",
            "ArrowUp": "\ue013", "ArrowRight": "\ue014", "ArrowDown": "\ue015",
            "Home": "\ue011", "End": "\ue010"}

    def key(self, name):
        v = self.KEYS[name]
        self.send("input.performActions", {"context": self.context, "actions": [
            {"type": "key", "id": "keyboard",
             "actions": [{"type": "keyDown", "value": v}, {"type": "keyUp", "value": v}]}]})

    def screenshot(self, path):
        data = self.send("browsingContext.captureScreenshot",
                         {"context": self.context, "origin": "document"})
        with open(path, "wb") as f:
            f.write(base64.b64decode(data["data"]))

    def dialogs(self):
        return [p for m, p in self.events if m == "browsingContext.userPromptOpened"]

    def console_errors(self):
        """Uncaught exceptions and console.error() calls of the page."""
        return [p for m, p in self.events if m == "log.entryAdded" and p.get("level") == "error"]

    def close(self):
        if self.ws:
            try:
                self.send("browser.close", timeout=10)
            except Exception:
                pass
            try:
                self.ws.close(timeout=2)
            except Exception:
                pass
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        shutil.rmtree(self.profile, ignore_errors=True)

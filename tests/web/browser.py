"""What the two browser drivers share (cdp.py for Chromium, bidi.py for
Firefox): finding the executable and waiting for a page expression. Each
driver has eval(expr) -> JSON-like value, open, screenshot, dialogs,
console_errors, close, mouse(x, y, click) and key(name), so one test drives
either."""
import json
import shutil
import time


def find(names):
    """The path of the first of names on PATH, or None."""
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    return None


class Driver:
    def eval(self, expr):
        raise NotImplementedError

    def wait(self, expr, timeout=20):
        """expr's value once it is truthy; TimeoutError after timeout seconds.
        A throwing expression counts as not yet true."""
        deadline = time.monotonic() + timeout
        value = None
        while time.monotonic() < deadline:
            try:
                value = self.eval(expr)
            except RuntimeError:
                value = None
            if value:
                return value
            time.sleep(0.1)
        raise TimeoutError("not true after %ss: %s (last %r)" % (timeout, expr, value))

    def mouse(self, x, y, click):
        """Moves the pointer to viewport (x, y), then presses and releases the
        left button if click: real input events, as a hand makes them."""
        raise NotImplementedError

    def key(self, name):
        """Presses and releases one key, a real input event: "Tab", "Enter",
        " " (Space), "ArrowLeft", "ArrowRight", "ArrowUp", "ArrowDown",
        "Home", "End"."""
        raise NotImplementedError

    def center(self, selector):
        """Viewport coordinates of the middle of the first element matching
        selector, after scrolling it into view."""
        return self.eval("(() => { const e = document.querySelector(%s);"
                         " e.scrollIntoView({block: 'center'});"
                         " const r = e.getBoundingClientRect();"
                         " return [Math.round(r.x + r.width / 2), Math.round(r.y + r.height / 2)]; })()"
                         % json.dumps(selector))

    def hover(self, selector):
        self.mouse(*self.center(selector), click=False)

    def click(self, selector):
        self.mouse(*self.center(selector), click=True)

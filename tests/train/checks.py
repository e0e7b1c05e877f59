"""The tests' own check: prints ok or FAIL with what was checked, and keeps
the failures for the exit status."""


class Checks:
    def __init__(self):
        self.failures = []

    def __call__(self, cond, what):
        print(("ok   " if cond else "FAIL ") + what)
        if not cond:
            self.failures.append(what)
        return cond

    def status(self):
        return 1 if self.failures else 0

"""The tests' own check: prints ok or FAIL with what was checked, and keeps
the failures for the exit status; and a small tmpfs for full-disk checks."""
import contextlib
import os
import subprocess


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


@contextlib.contextmanager
def small_tmpfs(path, size_mb, check, what):
    """Mounts a tmpfs of size_mb at path (made) for the with block, and
    unmounts it after. Yields False where this process may not mount: a note
    is printed, and under .ci/run (root, ICHTRIAGE_TEST_STRICT=1), where it
    can, check(False, ...) records that `what` did not run."""
    os.makedirs(path, exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=%dm" % size_mb, "tmpfs", path],
                      stderr=subprocess.DEVNULL).returncode != 0:
        check(os.environ.get("ICHTRIAGE_TEST_STRICT") != "1",
              "%s not run: mount -t tmpfs not permitted" % what)
        print("skipped %s: mount -t tmpfs not permitted" % what)
        yield False
        return
    try:
        yield True
    finally:
        subprocess.run(["umount", "-l", path])

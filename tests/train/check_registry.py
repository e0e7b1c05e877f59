#!/usr/bin/python3
"""tests/train/check_registry.py: `ichtriage model register|promote|rollback`
run by two writers at once (the retraining timer's auto-promote while an
admin promotes or rolls back) on a real registry folder:

- every command succeeds (none fails because another one runs);
- afterwards active.safetensors is, byte for byte, the model that the last
  line of active.log names (what `model list` marks and `rollback` uses);
- registrations at the same moment get ids of their own, each a whole copy
  of its model's weights, with the id as its version (what results, the
  worklist and the SR name the model by);
- no temporary file is left in the folder;
- the node's model (`predict` resolves it as `serve` does) is named by its
  id, and when active.safetensors is gone the registered copy of the model
  active.log names is taken, never the shipped demonstration model.

The two models are the shipped one and a copy with one output bias changed
(same size and header, as two fine-tunes of one architecture would be).

Usage: check_registry.py ICHTRIAGE SHIPPED_MODEL"""
import json
import os
import struct
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from checks import Checks, small_tmpfs  # noqa: E402

ICH, SHIPPED = sys.argv[1], sys.argv[2]
ROUNDS = 30
check = Checks()


def variant(src, dst):
    """src with the first value of out.bias changed: another valid model."""
    b = bytearray(open(src, "rb").read())
    hl = struct.unpack("<Q", b[:8])[0]
    start = 8 + hl + json.loads(b[8:8 + hl])["out.bias"]["data_offsets"][0]
    v = struct.unpack("<f", b[start:start + 4])[0]
    b[start:start + 4] = struct.pack("<f", v + 0.25)
    with open(dst, "wb") as f:
        f.write(b)


def read(path):
    with open(path, "rb") as f:
        return f.read()


def header(path):
    b = read(path)
    hl = struct.unpack("<Q", b[:8])[0]
    return json.loads(b[8:8 + hl]), b[8 + hl:]


def weights(path):
    """Each tensor's bytes by name: the model without its metadata."""
    h, data = header(path)
    return {k: data[v["data_offsets"][0]:v["data_offsets"][1]]
            for k, v in h.items() if k != "__metadata__"}


def version(path):
    return header(path)[0].get("__metadata__", {}).get("version")


def main():
    with tempfile.TemporaryDirectory(prefix="ichtriage-registry-") as tmp:
        store = os.path.join(tmp, "store")
        models = os.path.join(store, "models")
        a, c = os.path.join(tmp, "a.safetensors"), os.path.join(tmp, "c.safetensors")
        with open(a, "wb") as f:
            f.write(read(SHIPPED))
        variant(a, c)
        s = ["--set", "store.dir=" + store]

        def start(*args):
            return subprocess.Popen([ICH, "model", *s, *args], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)

        def finish(procs):
            out = []
            for p in procs:
                o, e = p.communicate(timeout=120)
                out.append((p.returncode, o.strip(), e.strip()))
            return out

        ida = finish([start("register", a)])[0][1]
        idc = finish([start("register", c)])[0][1]
        check(ida and idc and ida != idc, "two models registered: %s %s" % (ida, idc))
        # Registrations at once: an id each, each a whole copy of its file.
        regs = finish([start("register", a if k % 2 == 0 else c) for k in range(4)])
        check(all(rc == 0 for rc, _, _ in regs), "4 registrations at once succeed: %r" % regs)
        ids = [o.splitlines()[-1] if o else "" for _, o, _ in regs]
        check(len(set(ids)) == 4, "4 registrations at once get 4 ids: %r" % ids)
        for k, i in enumerate(ids):
            p = os.path.join(models, i + ".safetensors")
            check(os.path.exists(p) and weights(p) == weights(a if k % 2 == 0 else c)
                  and version(p) == i,
                  "registered %s holds its file's weights, version %r" % (i, version(p)))
        check(finish([start("promote", ida)])[0][0] == 0, "promote the first")
        check(finish([start("promote", idc)])[0][0] == 0, "promote the second")

        # Promotes and a rollback at once, ROUNDS times.
        failed, mismatched = [], []
        for r in range(ROUNDS):
            res = finish([start("promote", ida), start("promote", idc), start("rollback")])
            # A rollback finds nothing to go back to when every entry of the
            # log is the current model (promoted again and again meanwhile).
            failed += [(r, rc, e) for rc, _, e in res
                       if rc != 0 and "no earlier active model" not in e]
            with open(os.path.join(models, "active.log")) as f:
                tail = [x for x in f.read().splitlines() if x][-1]
            if read(os.path.join(models, "active.safetensors")) != \
                    read(os.path.join(models, tail + ".safetensors")):
                mismatched.append((r, tail))
        check(not failed, "no promote or rollback failed: %r" % failed[:3])
        check(not mismatched, "active.safetensors is the model active.log names last, "
              "after every round: %d of %d rounds not: %r" % (len(mismatched), ROUNDS,
                                                               mismatched[:3]))
        r = finish([start("list")])[0]
        star = [ln.split()[1] for ln in r[1].splitlines() if ln.startswith("*")]
        check(r[0] == 0 and star == [tail], "model list marks the log's last: %r" % star)
        left = [n for n in os.listdir(models) if n.endswith(".tmp") or ".tmp" in n]
        check(not left, "no temporary file left: %r" % left)

        # The same model promoted twice in a row, then a rollback: back to the
        # one before it (it "restored" the current one). 70 promotions, then
        # a rollback: the log keeps them all but the last (it was cut to 63).
        for i in (ida, idc, idc):
            finish([start("promote", i)])
        r = finish([start("rollback")])[0]
        check(r[0] == 0 and weights(os.path.join(models, "active.safetensors")) == weights(a),
              "rollback after a repeated promotion goes back to the model before: %r" % (r,))
        with open(os.path.join(models, "active.log")) as f:
            before = len([x for x in f.read().splitlines() if x])
        for k in range(70):
            finish([start("promote", ida if k % 2 else idc)])
        check(finish([start("rollback")])[0][0] == 0, "a rollback after 70 promotions")
        with open(os.path.join(models, "active.log")) as f:
            after = len([x for x in f.read().splitlines() if x])
        check(after == before + 69, "the log keeps the whole history: %d lines, %d expected"
              % (after, before + 69))

        # A promote killed between the file switch and its log line: the
        # file is another model than the log names last. The next command
        # that takes the lock puts back the log's (the command in force):
        # they had stayed apart, model list and rollback going by the log
        # while the node loaded the file.
        with open(os.path.join(models, "active.log")) as f:
            last = [x for x in f.read().splitlines() if x][-1]
        other = idc if weights(os.path.join(models, last + ".safetensors")) == weights(a) else ida
        with open(os.path.join(models, "active.safetensors"), "wb") as f:
            f.write(read(os.path.join(models, other + ".safetensors")))
        r = finish([start("register", a)])[0]
        check(r[0] == 0 and "event=model_active_repaired" in r[2] and
              read(os.path.join(models, "active.safetensors")) ==
              read(os.path.join(models, last + ".safetensors")),
              "the file that active.log does not name is put back: %r" % (r[2][-300:],))

        # The model in force is named by its id wherever a result names its
        # model; had been "active.safetensors" for every promoted model.
        ph = os.path.join(tmp, "ph")
        subprocess.run([ICH, "phantom", ph, "-n", "1", "--size", "128", "--seed", "5"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def predict():
            r = subprocess.run([ICH, "predict", "-c", "/dev/null", *s, "--json", ph],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               timeout=300)
            rows = json.loads(r.stdout) if r.returncode == 0 else []
            return r.returncode, [row.get("model_version") for row in rows], r.stderr

        rc, named, _ = predict()
        check(rc == 0 and named == [last], "predict names the active model %s: %r" % (last, named))
        # active.safetensors lost (a restore that left it out, a hand's rm):
        # the node had taken the shipped demonstration model in its place.
        os.unlink(os.path.join(models, "active.safetensors"))
        rc, named, _ = predict()
        check(rc == 0 and named == [last],
              "without active.safetensors, the registered copy of %s: %r" % (last, named))
        os.rename(os.path.join(models, last + ".safetensors"), os.path.join(tmp, "gone"))
        rc, named, err = predict()
        check(rc != 0 and "active.log names model %s" % last in err,
              "without either, no model and why: %d %r" % (rc, err[-300:]))

        # An admin's `sudo ichtriage model register|promote` in the node's
        # store (owned by its user): what it makes takes the store's owner,
        # or the node could not read the model nor take the lock (they were
        # root's, 0640).
        if os.geteuid() == 0:
            import pwd
            nobody = pwd.getpwnam("nobody")
            owned = os.path.join(tmp, "owned")
            os.mkdir(owned, 0o700)
            os.chown(owned, nobody.pw_uid, nobody.pw_gid)
            o = ["--set", "store.dir=" + owned]
            reg = subprocess.run([ICH, "model", *o, "register", a], stdout=subprocess.PIPE,
                                 text=True)
            oid = reg.stdout.strip().splitlines()[-1] if reg.stdout.strip() else ""
            pro = subprocess.run([ICH, "model", *o, "promote", oid])
            check(reg.returncode == 0 and pro.returncode == 0, "register and promote as root")
            wrong = []
            for root, dirs, files in os.walk(owned):
                for n in dirs + files:
                    st = os.stat(os.path.join(root, n))
                    if (st.st_uid, st.st_gid) != (nobody.pw_uid, nobody.pw_gid):
                        wrong.append((os.path.relpath(os.path.join(root, n), owned), st.st_uid))
            check(os.path.exists(os.path.join(owned, "models", "active.safetensors")) and
                  not wrong, "made as root, owned by the store's owner: %r" % wrong)
            # Someone else (not root: root reads anything) cannot read the
            # registry: an error, not an empty list ("no models", exit 0).
            r = subprocess.run(["setpriv", "--reuid=%d" % nobody.pw_uid,
                                "--regid=%d" % nobody.pw_gid, "--clear-groups", ICH, "model",
                                "--set", "store.dir=" + store, "list"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            check(r.returncode == 1 and "Permission denied" in r.stderr,
                  "model list without access fails: %d %r" % (r.returncode, r.stderr[-200:]))
        full_disk(tmp, a)
    return check.status()


def full_disk(tmp, model):
    """A promote onto a disk too full for the copy of the model fails with
    the system's reason and leaves no temporary file and no active model
    (the copy's short write had been reported with a stale errno: "No such
    file or directory"). Needs a small tmpfs (root, as in CI)."""
    mnt = os.path.join(tmp, "small")
    with small_tmpfs(mnt, 8, check, "full_disk") as mounted:
        if not mounted:
            return
        o = ["--set", "store.dir=" + mnt]
        reg = subprocess.run([ICH, "model", *o, "register", model], stdout=subprocess.PIPE,
                             text=True)
        mid = reg.stdout.strip().splitlines()[-1] if reg.stdout.strip() else ""
        check(reg.returncode == 0 and mid, "register onto the 8 MB disk")
        free = os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize
        with open(os.path.join(mnt, "fill"), "wb") as f:
            f.write(b"\0" * max(0, free - os.path.getsize(model) // 2))
        r = subprocess.run([ICH, "model", *o, "promote", mid], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
        check(r.returncode == 1 and "No space left on device" in r.stderr,
              "promote onto a full disk: %d %r" % (r.returncode, r.stderr[-200:]))
        left = sorted(os.listdir(os.path.join(mnt, "models")))
        check(left == [".lock", mid + ".safetensors"],
              "a failed promote leaves the registry as it was: %r" % left)


if __name__ == "__main__":
    sys.exit(main())

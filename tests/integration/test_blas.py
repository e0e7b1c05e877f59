#!/usr/bin/python3
"""OpenBLAS's kernels (nn/blas.c). Debian 12's OpenBLAS picks them by the
CPU's model number and falls back to Prescott's (SSE3) on a CPU it does not
know, such as Intel's Xeons of 2023 on: 2-3x slower matrix products, so
slower triage and training. The program then runs itself again with
OPENBLAS_CORETYPE naming kernels the CPU runs (SkylakeX with AVX-512,
Haswell with AVX2 and FMA), and says so; a coretype set by the admin stands.
On a CPU OpenBLAS knows, its own choice stands and nothing is rerun.

    test_blas.py /path/to/ichtriage"""
import os
import re
import subprocess
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tools"))
import itest  # noqa: E402

MODEL = os.path.join(HERE, "..", "..", "models", "default.safetensors")
AVX512 = {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}


def cpu_flags():
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("OPENBLAS_CORETYPE", "ICHTRIAGE_OPENBLAS_CHOSE", "OPENBLAS_VERBOSE")}
    env.update(extra)
    return env


class Kernels(unittest.TestCase):
    def kernels(self, **env):
        p = subprocess.run([itest.EXE, "--version"], env=clean_env(**env),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=True)
        m = re.search(r"^OpenBLAS kernels: (\S+)(.*)$", p.stdout.decode(), re.M)
        self.assertIsNotNone(m, p.stdout)
        return m.group(1), m.group(2)

    def test_not_the_fallback_where_the_cpu_runs_better(self):
        flags = cpu_flags()
        if not {"avx2", "fma"} <= flags:
            self.skipTest("no AVX2 and FMA here: Prescott's kernels may be the best it runs")
        core, note = self.kernels()
        self.assertNotEqual(core.lower(), "prescott", note)
        if "chose Prescott" in note:  # a CPU OpenBLAS does not know: our choice
            self.assertEqual(core, "SkylakeX" if AVX512 <= flags else "Haswell")
        # what OpenBLAS picks by itself is what the note says it picked
        verbose = subprocess.run([itest.EXE, "--version"], env=clean_env(OPENBLAS_VERBOSE="2"),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=True)
        first = re.search(r"Core: (\S+)", verbose.stderr.decode())
        if first and first.group(1).lower() == "prescott":
            self.assertIn("chose Prescott", note)

    def test_a_rerun_that_fails_goes_on_with_openblas_choice(self):
        """The program's file cannot be run again (failexec makes execv
        fail): it says why, and goes on with what OpenBLAS chose."""
        shim = os.environ.get("ICHTRIAGE_TEST_FAILEXEC")
        if not shim or not os.path.exists(shim):
            self.skipTest("no failexec shim (run through meson test)")
        if not {"avx2", "fma"} <= cpu_flags():
            self.skipTest("no AVX2 and FMA here: nothing better to run again with")
        p = subprocess.run([itest.EXE, "--version"],
                           env=clean_env(LD_PRELOAD=shim, OPENBLAS_VERBOSE="2"),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        first = re.search(r"Core: (\S+)", p.stderr.decode())
        if not first or first.group(1).lower() != "prescott":
            self.skipTest("OpenBLAS knows this CPU (%s): no rerun to fail"
                          % (first.group(1) if first else "?"))
        self.assertEqual(p.returncode, 0, p.stderr)
        out, err = p.stdout.decode(), p.stderr.decode()
        self.assertRegex(out, r"(?m)^OpenBLAS kernels: Prescott$")
        slow = [l for l in err.splitlines() if "event=nn_blas_slow" in l]
        self.assertEqual(len(slow), 1, err)
        better = "SkylakeX" if AVX512 <= cpu_flags() else "Haswell"
        self.assertIn("running again with OPENBLAS_CORETYPE=%s failed: Permission denied" % better,
                      slow[0])
        self.assertIn("level=warn", slow[0])

    def test_a_chosen_coretype_stands(self):
        self.assertEqual(self.kernels(OPENBLAS_CORETYPE="Prescott"), ("Prescott", ""))

    def test_the_model_log_line_names_the_kernels(self):
        """The line an admin reads (the node, train, eval and predict log it)."""
        if not os.path.exists(MODEL):
            self.skipTest("no default model in models/")
        with tempfile.TemporaryDirectory() as d:
            subprocess.run([itest.EXE, "phantom", os.path.join(d, "ph"), "--seed", "3", "-n", "1",
                            "--size", "128", "--slices", "8"], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            p = subprocess.run([itest.EXE, "predict", "-c", "/dev/null", "--set",
                                "triage.model=" + os.path.abspath(MODEL), "--json",
                                os.path.join(d, "ph")],
                               env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.assertEqual(p.returncode, 0, p.stderr)
        line = [l for l in p.stderr.decode().splitlines() if "event=nn_device" in l]
        self.assertEqual(len(line), 1, p.stderr)
        core, note = self.kernels()
        self.assertIn(" blas=%s" % core, line[0])
        self.assertEqual("blas_chosen_by_openblas=Prescott" in line[0], "chose Prescott" in note,
                         line[0])


if __name__ == "__main__":
    sys.exit(itest.main())

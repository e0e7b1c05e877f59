"""Cost of decoding pixels in a child process (issue 10): the same 40-slice
512x512 phantom head CTs triaged with triage.pixel_decoder = inline and =
child, in alternating rounds of 3 studies (a fresh node per round), from the
node's own series_triaged lines: ms_pixels (decode + preprocess) and ms_total
(the whole job). Prints each and the medians.

    /usr/bin/python3 bench/decoder.py build/ichtriage [ROUNDS]"""
import os
import re
import shutil
import statistics
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "tools"))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import dicomtest as dt  # noqa: E402
import triage as tb  # noqa: E402


def main():
    exe = os.path.abspath(sys.argv[1])
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    work = tempfile.mkdtemp(prefix="ichtriage-decoder-bench.")
    studies = tb.phantoms(exe, os.path.join(work, "ph"), 7, 3 * rounds)
    got = {"inline": [], "child": []}
    for rnd in range(rounds):
        for how in ("inline", "child"):
            node = dt.Node(exe, os.path.join(work, "%s%d" % (how, rnd)),
                           {"triage.quiet_seconds": 1, "triage.pixel_decoder": how}).start()
            for i, files in enumerate(studies[3 * rnd:3 * rnd + 3]):
                dt.storescu(node.port, files, workdir=work)
                tb.wait_results(node, i + 1)
            for line in node.events("series_triaged"):
                m = re.search(r"ms_pixels=(\d+) ms_model=\d+ ms_total=(\d+)", line)
                got[how].append((int(m.group(1)), int(m.group(2))))
            node.stop()
    for how, v in got.items():
        print("%-7s ms_pixels %s" % (how, " ".join(str(p) for p, _ in v)))
        print("%-7s ms_total  %s" % (how, " ".join(str(t) for _, t in v)))
    med = {how: (statistics.median(p for p, _ in v), statistics.median(t for _, t in v))
           for how, v in got.items()}
    print("RESULT pixels_inline_ms=%.1f pixels_child_ms=%.1f total_inline_ms=%.1f "
          "total_child_ms=%.1f" % (med["inline"][0], med["child"][0], med["inline"][1],
                                   med["child"][1]))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

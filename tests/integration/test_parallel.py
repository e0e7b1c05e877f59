#!/usr/bin/python3
"""Issue 2: 8 storescu processes at once, each sending its own series on its
own association: every instance is acknowledged, stored bit for bit and
indexed once; no series loses or gains an instance.

    test_parallel.py /path/to/ichtriage"""
import os
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))
import dicomtest as dt  # noqa: E402
import itest  # noqa: E402

SENDERS = 8
PER_SERIES = 25


class Parallel(itest.NodeTest):
    def test_eight_associations_at_once(self):
        study = None
        series = []
        for i in range(SENDERS):
            files = self.gen("s%d" % i, count=PER_SERIES, rows=512, cols=512, study_uid=study,
                             patient_id="PAT%d" % (i // 2))
            study = study or dt.sop_uids(files[0])[2]  # half the senders share a study
            if i % 2:
                study = None
            series.append(files)
        node = self.start_node()
        procs, configs = [], []
        for i, files in enumerate(series):
            cfg = dt.exact_config(files, self.work)
            configs.append(cfg)
            cmd = dt.storescu_cmd(node.port, files, calling="SENDER%d" % i, config=cfg)
            out = open(os.path.join(self.work, "storescu%d.log" % i), "w+b")
            procs.append((subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                           env=dt.storescu_env()), out))
        results = []
        for p, out in procs:
            p.wait(240)
            out.seek(0)
            text = out.read().decode("utf-8", "replace")
            out.close()
            statuses, assoc = dt.parse_storescu(text)
            results.append(dt.StoreResult(p.returncode, text, statuses, assoc))
        for files, r in zip(series, results):
            self.assertEqual(r.association, "accepted", r.output[-2000:])
            self.assert_all_success(r, files)
            self.assertEqual(r.rc, 0, r.output[-2000:])
        instances = node.instances()
        self.assertEqual(len(instances), SENDERS * PER_SERIES)
        for i, files in enumerate(series):
            self.assert_stored_exactly(node, files, instances)
            uid = dt.sop_uids(files[0])[3]
            count = node.query("SELECT instance_count FROM series WHERE series_uid = ?", (uid,))
            self.assertEqual([c[0] for c in count], [PER_SERIES], "series %d" % i)
            ae = {r[0] for r in node.query(
                "SELECT calling_ae FROM instances i JOIN series s ON i.series_id = s.id "
                "WHERE s.series_uid = ?", (uid,))}
            self.assertEqual(ae, {"SENDER%d" % i})
        self.assert_consistent(node)
        self.assertEqual(node.query("SELECT COUNT(*) FROM series")[0][0], SENDERS)
        self.assertEqual(node.query("SELECT COUNT(*) FROM studies")[0][0], SENDERS // 2)
        for c in configs:
            os.unlink(c)


if __name__ == "__main__":
    sys.exit(itest.main())

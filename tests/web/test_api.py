"""The JSON API, events, /metrics and /healthz of a real node on loopback
(issue 7), with curl: worklist order and filtering, the same rows as
`ichtriage worklist --json`, a study with per-slice probabilities and its key
slice as PNG, the review round trip (CSRF refused without the token, bad
bodies 400), claims, the audit table, a new study pushed on the event
stream, names converted from the Specific Character Set, unknown paths, and
`ichtriage calibrate --reviews` on the studies reviewed through the API.

    python3 test_api.py ICHTRIAGE MAKE_TEST_MODEL"""
import json
import os
import re
import subprocess
import time

import webtest as wt


def json_metadata(path):
    """The __metadata__ of a safetensors file."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n))["__metadata__"]

GROUPS = {"received": 1, "waiting": 1, "triaging": 1, "failed": 1, "triaged": 2}


def order_key(r):
    flagged = r["flagged"] and r["status"] != "reviewed"
    group = 0 if flagged else GROUPS.get(r["status"], 3)
    p = -r["probability"] if group in (0, 2) else 0
    return (group, p, r["received_at"])


class ApiTest(wt.WebTest):
    def setUp(self):
        super().setUp()
        self.node = self.web_node()
        ph = os.path.join(self.work, "ph")
        self.studies = wt.phantom(ph, seed=21, count=3)
        # One study too short to triage: not applicable, listed last.
        self.short = wt.phantom(os.path.join(self.work, "short"), seed=22, slices=3)
        self.files = [f for fs in list(self.studies.values()) + list(self.short.values())
                      for f in fs]
        self.send(self.node, self.files)
        self.rows = self.wait_rows(self.node, list(self.studies))
        self.rows = self.wait_rows(self.node, list(self.short), ("not_applicable",))

    def csrf(self):
        return self.get_json(self.node, "/api/session")["csrf"]

    def test_worklist_order_filter_and_cli_agree(self):
        rows = self.rows
        self.assertEqual(len(rows), 4)
        self.assertEqual([order_key(r) for r in rows], sorted(order_key(r) for r in rows))
        self.assertEqual(rows[-1]["status"], "not_applicable")
        for r in rows:
            self.assertEqual(r["notice"], "decision support, not a diagnosis")
            for k in ("study_uid", "series_uid", "accession", "patient_id", "patient_name",
                      "received_at", "updated_at", "slices", "probability", "subtypes",
                      "flagged", "status", "model_version"):
                self.assertIn(k, r)
        # `ichtriage worklist --json` gives the same rows in the same order.
        cli = self.cli_worklist(self.node)
        api = [{k: v for k, v in r.items() if k != "claimed_by"} for r in rows]
        self.assertEqual(api, cli)
        triaged = self.get_json(self.node, "/api/worklist?status=triaged")
        self.assertEqual({r["study_uid"] for r in triaged}, set(self.studies))
        self.assertEqual(self.get_json(self.node, "/api/worklist?status=reviewed"), [])
        err = self.get_json(self.node, "/api/worklist?status=bogus", 400)
        self.assertIn("status must be", err["error"])
        # longer than any status: refused, not read as no filter
        err = self.get_json(self.node, "/api/worklist?status=" + "triaged" * 8, 400)
        self.assertIn("status must be", err["error"])
        # Named without a value, or a value with a NUL in it: refused, not
        # read as no filter or as the status before the NUL.
        for query in ("status", "status=", "a=1&status", "status=reviewed%00x"):
            err = self.get_json(self.node, "/api/worklist?" + query, 400)
            self.assertIn("status must be", err["error"])

    def test_study_view_and_key_slice(self):
        uid = next(iter(self.studies))
        st = self.get_json(self.node, "/api/studies/" + uid)
        self.assertEqual(st["study_uid"], uid)
        self.assertEqual(len(st["slice_probabilities"]), 12)
        self.assertEqual([s["index"] for s in st["slice_probabilities"]], list(range(12)))
        self.assertEqual(len(st["series"]), 1)
        self.assertTrue(st["key_sop_uid"])
        status, hd, body = wt.curl("%s/api/studies/%s/slices/%s.png" % (
            self.node.base, uid, st["key_sop_uid"]))
        self.assertEqual(status, 200)
        self.assertEqual(hd["content-type"], ["image/png"])
        self.assertTrue(body.startswith(b"\x89PNG\r\n\x1a\n"))
        # A slice of another study is not served under this one.
        other = next(u for u in self.studies if u != uid)
        osop = self.get_json(self.node, "/api/studies/" + other)["key_sop_uid"]
        self.get_json(self.node, "/api/studies/%s/slices/%s.png" % (uid, osop), 404)
        # Pixels are decoded in the node only for slices triage decoded (in
        # its decoder child) first: not for a study that was not triaged.
        (suid, sfiles), = self.short.items()
        ssop = self.node.query("SELECT i.sop_uid FROM instances i JOIN series s ON s.id ="
                               " i.series_id JOIN studies st ON st.id = s.study_ref"
                               " WHERE st.study_uid = ?", (suid,))[0][0]
        self.get_json(self.node, "/api/studies/%s/slices/%s.png" % (suid, ssop), 404)
        self.get_json(self.node, "/api/studies/%s/slices/%s.png?frame=1" % (
            uid, st["key_sop_uid"]), 404)
        # A frame that is not a frame number is refused, not read as frame 0.
        for bad in ("=abc", "=0x", "=-1", "=1.5", "=", "", "=0%00"):
            self.get_json(self.node, "/api/studies/%s/slices/%s.png?frame%s" % (
                uid, st["key_sop_uid"], bad), 400)
        self.get_json(self.node, "/api/studies/1.2.3.4", 404)
        self.get_json(self.node, "/api/studies/not-a-uid", 404)
        self.get_json(self.node, "/nope", 404)
        self.get_json(self.node, "/api/nope", 404)
        # Opening is audited, as the local user: once in 10 minutes, however
        # often the page reloads it (it used to be a line per reload).
        self.get_json(self.node, "/api/studies/" + uid)
        rows = self.node.query("SELECT user, action FROM audit WHERE study_uid = ?", (uid,))
        self.assertEqual([tuple(r) for r in rows].count(("local", "opened")), 1, rows)
        import sqlite3
        con = sqlite3.connect(self.node.db_path, timeout=10)
        con.execute("UPDATE audit SET at = at - 600001 WHERE study_uid = ?", (uid,))
        con.commit()
        con.close()
        self.get_json(self.node, "/api/studies/" + uid)
        self.assertEqual(self.node.query("SELECT count(*) FROM audit WHERE study_uid = ? AND"
                                         " action = 'opened'", (uid,))[0][0], 2)

    def test_resent_slice_not_decoded_in_node(self):
        """A key slice sent again with other pixels replaces its file but
        keeps the old per-slice result: until it is triaged again (never
        here: quiet 600 s) its file has not been through the decoder child,
        so the node refuses to decode it for the PNG (409) and stays up."""
        import pydicom
        uid = next(iter(self.studies))
        st = self.get_json(self.node, "/api/studies/" + uid)
        key = st["key_sop_uid"]
        png = "/api/studies/%s/slices/%s.png" % (uid, key)
        self.assertEqual(wt.curl(self.node.base + png)[0], 200)
        src = next(f for f in self.studies[uid] if wt.dt.sop_uids(f)[1] == key)
        ds = pydicom.dcmread(src)
        arr = ds.pixel_array
        arr[...] = arr.max()
        ds.PixelData = arr.tobytes()
        resent = os.path.join(self.work, "resent.dcm")
        ds.save_as(resent)
        self.node.stop()
        self.node.settings["triage.quiet_seconds"] = "600"
        self.node.start()
        self.send(self.node, [resent])
        self.assertTrue(self.node.wait_event("instance_replaced"), self.node.log_tail())
        status, _, body = wt.curl(self.node.base + png)
        self.assertEqual(status, 409, body)
        self.assertIn("received again", json.loads(body)["error"])
        self.assertTrue(self.node.events("slice_image_refused"))
        # The other slices of the study, not re-sent, are still shown.
        other = next(s for s in st["slice_probabilities"] if s["sop_uid"] != key)
        self.assertEqual(wt.curl("%s/api/studies/%s/slices/%s.png" % (
            self.node.base, uid, other["sop_uid"]))[0], 200)
        self.assertTrue(self.node.alive())
        self.assertEqual(self.get_json(self.node, "/healthz")["status"], "ok")

    def test_resent_same_bytes_shown_other_bytes_triaged_again(self):
        """A key slice re-sent with the same bytes (a scanner's retry) is not
        new content: its image is still shown and its series is not triaged
        again. Re-sent with other pixels in a file of the same size, the
        series is triaged again (the size no longer stands for the content)
        and the image is shown once that triage is done."""
        import pydicom
        uid = next(iter(self.studies))
        key = self.get_json(self.node, "/api/studies/" + uid)["key_sop_uid"]
        png = "%s/api/studies/%s/slices/%s.png" % (self.node.base, uid, key)
        self.assertEqual(wt.curl(png)[0], 200)
        src = next(f for f in self.studies[uid] if wt.dt.sop_uids(f)[1] == key)
        row = "SELECT file_size, received_at, content_digest FROM instances WHERE sop_uid = ?"
        size, received, digest = self.node.query(row, (key,))[0]
        self.assertRegex(digest, "^[0-9a-f]{64}$")
        triaged = len(self.node.events("series_triaged"))
        complete = len(self.node.events("series_complete"))
        self.send(self.node, [src])
        self.assertTrue(self.node.wait_event("instance_replaced"), self.node.log_tail())
        self.assertEqual(tuple(self.node.query(row, (key,))[0]), (size, received, digest))
        self.assertEqual(wt.curl(png)[0], 200)
        # Decided again after the quiet period: the content triaged already.
        self.assertTrue(self.node.wait_event("series_complete", timeout=20, count=complete + 1),
                        self.node.log_tail())
        self.assertIn("state=triaged", self.node.events("series_complete")[-1])
        self.assertEqual(len(self.node.events("series_triaged")), triaged)
        self.assertEqual(wt.curl(png)[0], 200)
        # Other pixels, the same file size.
        with open(src, "rb") as f:
            raw = f.read()
        pixels = pydicom.dcmread(src).PixelData
        self.assertTrue(raw.endswith(pixels))
        flipped = bytes(b ^ 0x01 for b in pixels)
        resent = os.path.join(self.work, "resent.dcm")
        with open(resent, "wb") as f:
            f.write(raw[:len(raw) - len(pixels)] + flipped)
        self.send(self.node, [resent])
        self.assertTrue(self.node.wait_event("series_triaged", timeout=30, count=triaged + 1),
                        self.node.log_tail())
        size2, received2, digest2 = self.node.query(row, (key,))[0]
        self.assertEqual(size2, size)
        self.assertNotEqual(digest2, digest)
        self.assertGreater(received2, received)
        self.wait_rows(self.node, [uid])
        self.assertEqual(wt.curl(png)[0], 200)

    def test_review_round_trip(self):
        uid, other = list(self.studies)[:2]
        url = "%s/api/studies/%s/review" % (self.node.base, uid)
        # Two slices marked as showing the bleed (retraining labels).
        sl = self.get_json(self.node, "/api/studies/" + uid)["slice_probabilities"]
        marks = [{"sop_uid": s["sop_uid"], "frame": s["frame"]} for s in sl[3:5]]
        foreign = self.get_json(self.node, "/api/studies/" + other)["slice_probabilities"][0]
        # The form allows 4000 characters; these take 7991 bytes.
        good = {"hemorrhage": True, "subtypes": ["subdural", "subarachnoid"],
                "comment": "thin SDH " + "\u00e9" * 3991, "slices": marks}
        status, _, body = wt.curl(url, "POST", good)
        self.assertEqual(status, 403, body)  # no CSRF token
        status, _, body = wt.curl(url, "POST", good, headers=["X-CSRF-Token: wrong"])
        self.assertEqual(status, 403, body)
        tok = "X-CSRF-Token: " + self.csrf()
        for bad, why in (("{", "JSON object"), ({"subtypes": []}, "hemorrhage"),
                         ({"hemorrhage": True, "subtypes": ["bleed"]}, "subtypes"),
                         ({"hemorrhage": False, "subtypes": ["subdural"]}, "false"),
                         ({"hemorrhage": True, "comment": 3}, "comment"),
                         ({"hemorrhage": True, "comment": "a" * 4001}, "comment"),
                         ({"hemorrhage": True, "slices": "all"}, "slices"),
                         ({"hemorrhage": True, "slices": [{"sop_uid": "not a uid"}]}, "slices"),
                         ({"hemorrhage": False, "slices": marks}, "false"),
                         ({"hemorrhage": True, "slices": [{"sop_uid": foreign["sop_uid"]}]},
                          "not a slice of this study"),
                         ({"hemorrhage": True, "slices": [dict(marks[0], frame=7)]},
                          "not a slice of this study")):
            status, _, body = wt.curl(url, "POST", bad, headers=[tok])
            self.assertEqual(status, 400, (bad, body))
            self.assertIn(why, json.loads(body)["error"])
        status, _, body = wt.curl(url, "POST", good, headers=[tok])
        self.assertEqual(status, 201, body)
        # Reviewed studies leave the list and are found with ?status=reviewed.
        self.assertNotIn(uid, [r["study_uid"] for r in self.get_json(self.node, "/api/worklist")])
        reviewed = self.get_json(self.node, "/api/worklist?status=reviewed")
        self.assertEqual([r["study_uid"] for r in reviewed], [uid])
        self.assertEqual([{k: v for k, v in r.items() if k != "claimed_by"} for r in reviewed],
                         self.cli_worklist(self.node, "reviewed"))
        st = self.get_json(self.node, "/api/studies/" + uid)
        self.assertEqual(st["status"], "reviewed")
        (rev,) = st["reviews"]
        self.assertEqual(rev["reviewer"], "local")
        self.assertTrue(rev["hemorrhage"])
        self.assertEqual(sorted(rev["subtypes"]), ["subarachnoid", "subdural"])
        self.assertEqual(rev["comment"], good["comment"])
        self.assertEqual(rev["slices"], marks)
        rows = self.node.query("SELECT r.hemorrhage, r.subtypes, r.reviewer, r.slices FROM reviews r"
                               " JOIN studies s ON s.id = r.study_ref WHERE s.study_uid = ?",
                               (uid,))
        self.assertEqual([tuple(r) for r in rows],
                         [(1, "subdural,subarachnoid", "local",
                           ",".join("%s/%d" % (m["sop_uid"], m["frame"]) for m in marks))])
        audit = self.node.query("SELECT user, action FROM audit WHERE study_uid = ?", (uid,))
        self.assertIn(("local", "reviewed"), [tuple(r) for r in audit])
        status, _, _ = wt.curl("%s/api/studies/1.2.3/review" % self.node.base, "POST", good,
                               headers=[tok])
        self.assertEqual(status, 404)
        # The review counts in the live sensitivity (not flagged: a miss).
        _, _, metrics = wt.curl(self.node.base + "/metrics")
        self.assertIn(b'ichtriage_reviews{flagged="false",hemorrhage="true"} 1', metrics)
        self.assertIn(b"ichtriage_live_sensitivity 0.0000", metrics)

    def test_review_names_what_its_reader_saw(self):
        """Two readers of one study: a review sent with the view its reader
        saw (the latest review's id, the result's version) is refused, 409
        naming the other reader's review, when another review or a newer
        result came since; nothing is stored, and sent again with what the
        409 says it is stored. A body without seen_review saw no review.
        The later review had replaced the earlier one silently (201)."""
        uid = list(self.studies)[0]
        url = "%s/api/studies/%s/review" % (self.node.base, uid)
        tok = "X-CSRF-Token: " + self.csrf()
        st = self.get_json(self.node, "/api/studies/" + uid)
        self.assertEqual(st["review_id"], 0)
        (created,), = self.node.query("SELECT max(r.created_at) FROM results r JOIN series s"
                                      " ON s.id = r.series_ref JOIN studies st ON"
                                      " st.id = s.study_ref WHERE st.study_uid = ?", (uid,))
        self.assertEqual(st["result_version"], created)
        seen = {"seen_review": st["review_id"], "seen_result": st["result_version"]}
        first = dict(seen, hemorrhage=True, subtypes=["subdural"], comment="A: SDH left")
        status, _, body = wt.curl(url, "POST", first, headers=[tok])
        self.assertEqual(status, 201, body)
        (mine,) = json.loads(body)["reviews"]
        # The second reader opened the study before the first saved.
        second = dict(seen, hemorrhage=False, comment="B: nothing")
        for stale in (second, {"hemorrhage": False}):
            status, _, body = wt.curl(url, "POST", stale, headers=[tok])
            self.assertEqual(status, 409, body)
            conflict = json.loads(body)
            self.assertIn("local reviewed this study at %s (hemorrhage: subdural)"
                          % mine["created_at"], conflict["error"])
            self.assertEqual((conflict["review"]["id"], conflict["review"]["comment"]),
                             (mine["id"], "A: SDH left"))
            self.assertEqual((conflict["review_id"], conflict["result_version"]),
                             (mine["id"], created))
        self.assertEqual(len(self.get_json(self.node, "/api/studies/" + uid)["reviews"]), 1)
        self.assertTrue(self.node.events("review_conflict"))
        # A result newer than the one seen: refused too.
        status, _, body = wt.curl(url, "POST", dict(second, seen_review=mine["id"],
                                                    seen_result=created - 1), headers=[tok])
        self.assertEqual(status, 409, body)
        self.assertIn("a newer result came", json.loads(body)["error"])
        for bad in ({"seen_review": "x"}, {"seen_review": -1}, {"seen_result": 1.5}):
            status, _, body = wt.curl(url, "POST", dict(second, **bad), headers=[tok])
            self.assertEqual(status, 400, (bad, body))
        # Having looked again: stored, the latest review now the second's.
        status, _, body = wt.curl(url, "POST", dict(second, seen_review=conflict["review_id"],
                                                    seen_result=conflict["result_version"]),
                                  headers=[tok])
        self.assertEqual(status, 201, body)
        st = self.get_json(self.node, "/api/studies/" + uid)
        self.assertEqual([r["comment"] for r in st["reviews"]], ["A: SDH left", "B: nothing"])
        self.assertEqual(st["review_id"], st["reviews"][-1]["id"])

    def test_reviews_recalibrate_the_model(self):
        """`ichtriage calibrate --reviews` on what radiologists reviewed here,
        the node still running: refused while only one label exists (nothing
        written), then new thresholds picked on the two reviewed studies."""
        pos, neg, _ = list(self.studies)
        tok = "X-CSRF-Token: " + self.csrf()
        model = self.node.settings["triage.model"]
        out = os.path.join(self.work, "recalibrated.safetensors")
        argv = [wt.itest.EXE, "calibrate", model, "--reviews", "-c", "/dev/null", "--set",
                "store.dir=" + self.node.store_dir, "-o", out, "--threads", "1"]

        def review(uid, body):
            status, _, resp = wt.curl("%s/api/studies/%s/review" % (self.node.base, uid), "POST",
                                      body, headers=[tok])
            self.assertEqual(status, 201, resp)

        review(neg, {"hemorrhage": False})
        p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.assertNotEqual(p.returncode, 0, p.stdout)
        self.assertIn("found 0 positive and 1 negative", p.stderr)
        self.assertFalse(os.path.exists(out))

        review(pos, {"hemorrhage": True, "subtypes": ["subdural"]})
        p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertIn("2 reviewed series of " + self.node.store_dir, p.stdout)
        self.assertIn("only 1 positive study", p.stderr)
        # Sensitivity 0.95 of one positive study: the threshold takes it.
        after = [l for l in p.stdout.splitlines() if l.startswith("after")]
        self.assertEqual(len(after), 1, p.stdout)
        self.assertIn("sensitivity 1.000 (1 of 1)", after[0])
        meta = json_metadata(out)
        self.assertIn("reviewed series", meta["calibration"])
        self.assertIn("reviewed series", meta["threshold_rule"])

    def test_claim(self):
        uid = next(iter(self.studies))
        tok = "X-CSRF-Token: " + self.csrf()
        status, _, body = wt.curl("%s/api/studies/%s/claim" % (self.node.base, uid), "POST", {},
                                  headers=[tok])
        self.assertEqual(status, 200, body)
        row = next(r for r in self.get_json(self.node, "/api/worklist") if r["study_uid"] == uid)
        self.assertEqual(row["claimed_by"], "local")
        status, _, _ = wt.curl("%s/api/studies/%s/release" % (self.node.base, uid), "POST", {},
                               headers=[tok])
        self.assertEqual(status, 200)
        status, _, _ = wt.curl("%s/api/studies/%s/release" % (self.node.base, uid), "POST", {},
                               headers=[tok])
        self.assertEqual(status, 409)

    def test_events_push_a_new_study(self):
        proc, events = self.event_stream()
        try:
            first = events[0]
            self.assertEqual(first["event"], "worklist")
            self.assertTrue(first["data"]["full"])
            self.assertEqual(len(first["data"]["rows"]), 4)
            self.assertEqual(first["data"]["order"], [r["study_uid"] for r in self.rows])
            new = wt.phantom(os.path.join(self.work, "new"), seed=23)
            (uid, files), = new.items()
            self.send(self.node, files)
            deadline = time.monotonic() + 30
            seen = None
            while time.monotonic() < deadline and not seen:
                for ev in list(events[1:]):
                    d = ev.get("data", {})
                    if any(r["study_uid"] == uid and r["status"] == "triaged" for r in d["rows"]):
                        seen = d
                time.sleep(0.1)
            self.assertTrue(seen, "triaged study never pushed; %d events" % len(events))
            # Later events carry only what changed; the order came when the
            # study joined the list, and it is the API's order.
            for ev in events[1:]:
                self.assertFalse(ev["data"]["full"])
                self.assertLessEqual(len(ev["data"]["rows"]), 2)
            orders = [ev["data"]["order"] for ev in events[1:] if "order" in ev["data"]]
            self.assertTrue(orders)
            time.sleep(0.5)
            api = [r["study_uid"] for r in self.get_json(self.node, "/api/worklist")]
            self.assertEqual(orders[-1], api)
            _, _, metrics = wt.curl(self.node.base + "/metrics")
            self.assertIn(b"ichtriage_event_streams 1", metrics)
        finally:
            proc.kill()
            proc.wait()

    def test_events_keep_alive_is_an_event(self):
        """Every 15 s the stream carries an event "ping": a page hears it
        (EventSource hands comments to nobody) and can tell a live stream
        from one that died without being closed. It was a comment."""
        t0 = time.monotonic()
        p = subprocess.run(["curl", "-sN", "-m", "17", self.node.base + "/api/events"],
                           stdout=subprocess.PIPE)
        self.assertGreater(time.monotonic() - t0, 16)  # ended by -m, not by the node
        text = p.stdout.decode()
        self.assertIn("\nevent: ping\ndata: {}\n\n", text, text[-300:])

    def test_events_push_a_decision_without_a_job(self):
        # A chest CT is decided "not applicable" at the end of its quiet
        # period, on the loop's timer: no job, so no result to announce.
        # The stream ended with the study "received" and never heard the
        # decision; the page showed it as waiting for triage.
        import pydicom
        proc, events = self.event_stream()
        try:
            chest = wt.phantom(os.path.join(self.work, "chest"), seed=26)
            (uid, files), = chest.items()
            for f in files:
                ds = pydicom.dcmread(f)
                ds.BodyPartExamined = "CHEST"
                ds.StudyDescription = ds.SeriesDescription = "CT THORAX"
                ds.save_as(f)
            self.send(self.node, files)
            rows = self.wait_rows(self.node, [uid], ("not_applicable",))
            (row,) = [r for r in rows if r["study_uid"] == uid]
            self.assertIn("not a head study", row["status_reason"])
            deadline = time.monotonic() + 5
            pushed = []
            while time.monotonic() < deadline and "not_applicable" not in pushed:
                pushed = [r["status"] for ev in events[1:] for r in ev["data"]["rows"]
                          if r["study_uid"] == uid]
                time.sleep(0.1)
            self.assertIn("not_applicable", pushed, "statuses pushed: %s" % pushed)
        finally:
            proc.kill()
            proc.wait()

    def test_a_series_left_out_is_named_in_the_reason(self):
        """A study with series triage left out (a 3-image "SCOUT", three
        images of a series without description): the row's reason names
        each series it comes from, and the study lists every series with
        its number, description, images, state and reason. The reasons had
        been joined bare ("3 axial slices, fewer than
        triage.min_slices=5; 3 axial ..."), as if said of the series that
        set the result."""
        (uid, files), = wt.phantom(os.path.join(self.work, "named"), seed=27).items()
        scout, sfiles = wt.test_triage.another_series(
            files[:3], os.path.join(self.work, "scout"), number=1, description="SCOUT")
        bare, bfiles = wt.test_triage.another_series(
            files[3:6], os.path.join(self.work, "bare"), number=7, description="")
        self.send(self.node, files + sfiles + bfiles)
        self.wait_rows(self.node, [uid])
        deadline = time.monotonic() + 30
        while True:
            st = self.get_json(self.node, "/api/studies/" + uid)
            if [s["state"] for s in st["series"]] == ["not_applicable", "triaged", "not_applicable"]:
                break
            self.assertLess(time.monotonic(), deadline, st["series"])
            time.sleep(0.2)
        few = "3 axial slices, fewer than triage.min_slices=5"
        (row,) = [r for r in self.get_json(self.node, "/api/worklist") if r["study_uid"] == uid]
        self.assertEqual(row["status"], "triaged")
        self.assertEqual(row["status_reason"], "SCOUT: %s; series 7: %s" % (few, few))
        self.assertEqual(st["status_reason"], row["status_reason"])
        desc = st["series"][1]["description"]
        self.assertTrue(desc.startswith("Phantom head axial"), desc)
        self.assertEqual([(s["number"], s["description"], s["instances"], s["reason"],
                           s["series_uid"] == st["series_uid"]) for s in st["series"]],
                         [(1, "SCOUT", 3, few, False), (2, desc, 12, "", True),
                          (7, "", 3, few, False)])
        self.assertEqual({s["series_uid"] for s in st["series"]} - {st["series_uid"]},
                         {scout, bare})

    def test_slices_from_the_feet_with_their_image_numbers(self):
        """Per-slice results go from the feet to the head whatever way the
        columns run, each with the InstanceNumber PACS shows: a series
        numbered from the head with columns running 0,-1,0 had come out
        head first (the page labels the strip foot to head), and a slice
        was known by its position alone."""
        import pydicom
        (uid, files), = wt.phantom(os.path.join(self.work, "hf"), seed=28).items()
        wt.head_first(files)
        self.send(self.node, files)
        self.wait_rows(self.node, [uid])
        st = self.get_json(self.node, "/api/studies/" + uid)
        sops = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
        got = st["slice_probabilities"]
        self.assertEqual([s["sop_uid"] for s in got], sops, "not from the feet to the head")
        self.assertEqual([(s["index"], s["instance_number"], s["frames"]) for s in got],
                         [(i, 12 - i, 1) for i in range(12)])

    def test_study_date_and_prior(self):
        """Rows carry the study's date and time (as stored, and as
        ISO-8601 in the scanner's time) and mark a study dated more than 2
        days before it arrived as a prior, in the API, `ichtriage worklist
        --json` and its text: the only time had been the arrival, and an
        old study sent again looked like a new one."""
        import datetime
        (new, files), = wt.phantom(os.path.join(self.work, "today"), seed=29).items()
        now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
        wt.date_study(files, now - datetime.timedelta(hours=1))
        self.send(self.node, files)
        rows = {r["study_uid"]: r for r in self.wait_rows(self.node, [new])}
        made = (now - datetime.timedelta(hours=1)).replace(tzinfo=None)
        self.assertEqual((rows[new]["study_date"], rows[new]["study_time"],
                          rows[new]["study_datetime"], rows[new]["prior"]),
                         (made.strftime("%Y%m%d"), made.strftime("%H%M%S"), made.isoformat(),
                          False))
        import pydicom
        old = {}
        for uid, fs in self.studies.items():  # phantoms are dated 2020 to 2024
            ds = pydicom.dcmread(fs[0], stop_before_pixels=True)
            when = datetime.datetime.strptime(ds.StudyDate + ds.StudyTime, "%Y%m%d%H%M%S")
            old[uid] = when.isoformat()
            self.assertEqual((rows[uid]["study_datetime"], rows[uid]["prior"]),
                             (when.isoformat(), True))
        st = self.get_json(self.node, "/api/studies/" + next(iter(self.studies)))
        self.assertTrue(st["prior"])
        self.assertEqual(st["study_datetime"], old[st["study_uid"]])
        cli = {r["study_uid"]: r for r in self.cli_worklist(self.node)}
        self.assertEqual({u: (r["study_datetime"], r["prior"]) for u, r in cli.items()},
                         {u: (r["study_datetime"], r["prior"]) for u, r in rows.items()})
        p = subprocess.run([wt.itest.EXE, "worklist", "-c", "/dev/null", "--set",
                            "store.dir=" + self.node.store_dir], stdout=subprocess.PIPE,
                           text=True, check=True)
        date = {}
        for u in rows:
            line = next(l for l in p.stdout.splitlines() if u in l)
            date[u] = re.search(r" (\d{4}-\d\d-\d\d)( prior)? ", line).groups()
        self.assertEqual(date[new], (made.strftime("%Y-%m-%d"), None))
        for uid in self.studies:
            self.assertEqual(date[uid], (old[uid][:10], " prior"))

    def test_names_converted_and_not_markup(self):
        xss = wt.phantom(os.path.join(self.work, "xss"), seed=24)
        (xuid, xfiles), = xss.items()
        wt.rename(xfiles, wt.XSS_NAME)
        lat = wt.phantom(os.path.join(self.work, "lat"), seed=25)
        (luid, lfiles), = lat.items()
        wt.rename(lfiles, wt.LATIN1_NAME, "ISO_IR 100")
        # Every other DICOM string of the Latin-1 study in Latin-1 too, and
        # a Patient ID with terminal escape sequences in the other one.
        import pydicom
        acc, desc, sid = "\u00c4123", "Sch\u00e4del nativ", "\u00dc7"
        for f in lfiles:
            ds = pydicom.dcmread(f)
            ds.AccessionNumber, ds.SeriesDescription, ds.StudyID = acc, desc, sid
            ds.save_as(f)
        evil_id = "ID\x1b]0;owned\x07\x1b[2JX"
        for f in xfiles:
            ds = pydicom.dcmread(f)
            ds.PatientID = evil_id
            ds.save_as(f)
        self.send(self.node, xfiles + lfiles)
        self.wait_rows(self.node, [xuid, luid])
        stored = self.node.query("SELECT CAST(accession AS BLOB) FROM studies WHERE study_uid = ?",
                                 (luid,))
        self.assertEqual(stored[0][0], acc.encode("latin-1"))  # as the dataset had it
        status, _, body = wt.curl(self.node.base + "/api/worklist")
        rows = json.loads(body.decode("utf-8"))  # strict: the body is UTF-8
        names = {r["study_uid"]: r["patient_name"] for r in rows}
        self.assertEqual(names[xuid], wt.XSS_NAME)
        self.assertEqual(names[luid], wt.LATIN1_NAME)
        lrow = next(r for r in rows if r["study_uid"] == luid)
        self.assertEqual(lrow["accession"], acc)
        status, _, body = wt.curl(self.node.base + "/api/studies/" + luid)
        st = json.loads(body.decode("utf-8"))
        self.assertEqual((st["accession"], st["study_id"], st["series"][0]["description"]),
                         (acc, sid, desc))
        # `ichtriage worklist` (text) shows the converted accession and
        # prints no control byte a peer sent (terminal escape sequences).
        p = subprocess.run([wt.itest.EXE, "worklist", "-c", "/dev/null", "--set",
                            "store.dir=" + self.node.store_dir], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, check=True)
        text = p.stdout.decode("utf-8")
        self.assertIn(acc, text)
        self.assertFalse([ch for ch in text if ch != "\n" and
                          (ord(ch) < 0x20 or 0x7f <= ord(ch) < 0xa0)], repr(text))
        self.assertIn("ID?]0;owned??[2J ", text)
        stored = self.node.query("SELECT CAST(p.patient_name AS BLOB) FROM patients p JOIN studies s"
                                 " ON s.patient_ref = p.id WHERE s.study_uid = ?", (luid,))
        self.assertEqual(stored[0][0], wt.LATIN1_NAME.encode("latin-1"))  # as the dataset had it
        self.assertEqual(self.get_json(self.node, "/api/studies/" + luid)["patient_name"],
                         wt.LATIN1_NAME)
        # The command converts the same way as the API.
        cli = {r["study_uid"]: r["patient_name"] for r in self.cli_worklist(self.node)}
        self.assertEqual(cli[luid], wt.LATIN1_NAME)
        self.assertEqual(cli[xuid], wt.XSS_NAME)

    def test_metrics_and_health(self):
        status, hd, body = wt.curl(self.node.base + "/metrics")
        self.assertEqual(status, 200)
        self.assertTrue(hd["content-type"][0].startswith("text/plain; version=0.0.4"))
        text = body.decode()
        for name in ("ichtriage_instances_received_total 39",
                     'ichtriage_instances_rejected_total{reason="low_space"} 0',
                     "ichtriage_associations_active", "ichtriage_series_completed_total 4",
                     'ichtriage_queue_depth{state="queued"} 0', "ichtriage_jobs_failed_total 0",
                     "ichtriage_triage_latency_seconds_count 3",
                     'ichtriage_triage_latency_seconds_bucket{le="+Inf"} 3',
                     'ichtriage_model_loaded{version="test-random-weights"} 1',
                     "ichtriage_spool_free_bytes"):
            self.assertIn(name, text)
        for line in text.splitlines():
            self.assertTrue(line.startswith("#") or len(line.split(" ")) == 2, line)
        h = self.get_json(self.node, "/healthz")
        self.assertEqual(h, {"status": "ok", "degraded": []})
        status, _, _ = wt.curl(self.node.base + "/healthz", "POST", {})
        self.assertEqual(status, 405)
        # No login on loopback, so no other host name either (DNS rebinding).
        status, _, body = wt.curl(self.node.base + "/api/worklist", headers=["Host: evil.example"])
        self.assertEqual(status, 403, body)
        for host in ("localhost", "localhost:%d" % self.node.http_port, "127.0.0.1"):
            self.assertEqual(wt.curl(self.node.base + "/api/worklist",
                                     headers=["Host: " + host])[0], 200, host)


def png_grey(data):
    """The pixels (rows of bytes) of an 8-bit grey, non-interlaced PNG."""
    import struct
    import zlib
    pos, idat, width, height = 8, b"", 0, 0
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            width, height = struct.unpack(">II", chunk[:8])
            assert chunk[8:13] == b"\x08\x00\x00\x00\x00", chunk  # 8-bit grey, plain
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + n
    raw, rows, prev = zlib.decompress(idat), [], bytearray(width)
    for y in range(height):
        f, line = raw[y * (width + 1)], bytearray(raw[y * (width + 1) + 1:(y + 1) * (width + 1)])
        for x in range(width):
            a = line[x - 1] if x else 0
            b, c = prev[x], prev[x - 1] if x else 0
            p = a + b - c
            pred = (0, a, b, (a + b) // 2,
                    a if abs(p - a) <= abs(p - b) and abs(p - a) <= abs(p - c)
                    else b if abs(p - b) <= abs(p - c) else c)[f]
            line[x] = (line[x] + pred) & 0xFF
        rows.append(bytes(line))
        prev = line
    return rows


class ClockStepTest(wt.WebTest):
    def test_a_series_completes_after_the_wall_clock_went_back(self):
        """A series whose last instance came just before the wall clock went
        back an hour (NTP stepping, a restored VM) is complete after its
        quiet period, not an hour later when the clock has caught up, and
        triaged once; the next study, received on the new time, completes
        as usual."""
        shim = os.environ.get("ICHTRIAGE_TEST_CLOCKSTEP")
        if not shim:
            wt.itest.skip_or_fail(self, "no clockstep shim (run through meson test)")
        step = os.path.join(self.work, "clockstep")
        with open(step, "w") as f:
            f.write("0")
        node = self.web_node(env={"LD_PRELOAD": shim, "ICHTRIAGE_CLOCKSTEP_FILE": step})
        studies = wt.phantom(os.path.join(self.work, "ph"), seed=61, count=2)
        (first, ffiles), (second, sfiles) = sorted(studies.items())
        self.send(node, ffiles)
        with open(step, "w") as f:
            f.write("-3600")
        self.wait_rows(node, [first], timeout=30)
        self.send(node, sfiles)
        rows = self.wait_rows(node, [second], timeout=30)
        # triaged once: its job was not taken for one that saw new bytes
        # (instances "received" an hour ahead of the new time had made every
        # job's series be triaged again, over and over)
        self.assertEqual([r["result_updates"] for r in rows if r["study_uid"] == first], [0], rows)
        self.assertEqual(node.query("SELECT count(*) FROM jobs")[0][0], 2)


class EnhancedPngTest(wt.WebTest):
    def test_one_frame_of_a_multi_frame_file(self):
        """The key images of an Enhanced CT (one JPEG-LS file of 200 frames)
        decode only the frame asked for: each PNG takes a small part of what
        decoding the whole file took triage, so the loop is not stalled, and
        it shows that very frame in the brain window."""
        import numpy as np
        import pydicom
        files = self.gen("enh", count=200, rows=512, cols=512, sop="enhanced-ct", ts="jpegls")
        node = self.web_node()
        self.send(node, files)
        uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
        self.wait_rows(node, [uid], timeout=180)
        key = self.get_json(node, "/api/studies/" + uid)["key_sop_uid"]
        (ms_pixels,), = node.query("SELECT ms_pixels FROM results")
        plain = os.path.join(self.work, "plain.dcm")
        subprocess.run(["dcmdjpls", files[0], plain], check=True)
        frames = pydicom.dcmread(plain).pixel_array.astype(np.float64) - 1024  # HU
        times = []
        for frame in (0, 100, 199):
            t0 = time.monotonic()
            status, _, body = wt.curl("%s/api/studies/%s/slices/%s.png?frame=%d" % (
                node.base, uid, key, frame))
            times.append(time.monotonic() - t0)
            self.assertEqual(status, 200, body[:200])
            want = np.clip(np.floor(frames[frame] / 80 * 255 + 0.5), 0, 255)
            got = np.array([list(r) for r in png_grey(body)], dtype=np.float64)
            self.assertEqual(got.shape, want.shape)
            self.assertLessEqual(np.abs(got - want).max(), 1, frame)
        self.get_json(node, "/api/studies/%s/slices/%s.png?frame=200" % (uid, key), 404)
        # Decoding all 200 frames took the child ms_pixels; one frame is a
        # small part of it (the whole file took as long as ms_pixels here).
        self.assertLess(max(times), ms_pixels / 1000 / 5, (times, ms_pixels))


def node_with_studies(test, n):
    """A node (no model) whose index holds n triaged studies 1.2.0, 1.2.1, ...
    arrived in the last hour (inside the open list's age window)."""
    return test.node_with_rows([("1.2.%d" % i, "triaged", 0, (i % 97) / 97, 3600000 - i)
                                for i in range(n)])


class LongListTest(wt.WebTest):
    def test_first_event_of_a_long_list(self):
        # 2500 studies make a first event over 1 MiB: it must arrive whole.
        node = node_with_studies(self, 2500)
        rows = self.get_json(node, "/api/worklist")
        self.assertEqual(len(rows), 2500)
        p = subprocess.run(["curl", "-sN", "-m", "5", node.base + "/api/events"],
                           stdout=subprocess.PIPE)
        data = [l for l in p.stdout.decode().splitlines() if l.startswith("data: ")]
        first = json.loads(data[0][6:])
        self.assertGreater(len(data[0]), 1 << 20)
        self.assertEqual(first["order"], [r["study_uid"] for r in rows])
        self.assertEqual(len(first["rows"]), 2500)


class AgeWindowTest(wt.WebTest):
    def uids(self, node, query=""):
        return [r["study_uid"] for r in self.get_json(node, "/api/worklist" + query)]

    def test_old_studies_that_need_no_action_leave_the_open_list(self):
        """The open list (http.worklist_days, 7 by default) leaves out studies
        triaged and not flagged, or not applicable, with no new image or
        result for more than 7 days; old flagged, failed, waiting and
        received ones stay in their places. ?status= lists every study of its status, old ones too;
        `ichtriage worklist` leaves out the same, --all lists them; the events
        say how many are left out, and a study that grows old while a page
        listens leaves the list. The list had kept every study until it was
        reviewed, however old."""
        node = self.node_with_rows(wt.AGE_WINDOW_ROWS)
        self.assertEqual(self.uids(node), ["1.9.3", "1.9.4", "1.9.5", "1.9.6", "1.9.7", "1.9.8"])
        self.assertEqual(self.uids(node, "?status=triaged"), ["1.9.3", "1.9.1", "1.9.7"])
        self.assertEqual(self.uids(node, "?status=not_applicable"), ["1.9.2", "1.9.8"])
        # API clients are told what was left out, as the page is (not for a
        # ?status= list, which leaves nothing out).
        _, headers, _ = wt.curl(node.base + "/api/worklist")
        self.assertEqual(headers.get("x-worklist-hidden"), ["triaged=1, not_applicable=1, days=7"])
        _, headers, _ = wt.curl(node.base + "/api/worklist?status=triaged")
        self.assertNotIn("x-worklist-hidden", headers)
        # The command line: the same list, and --all without the window.
        self.assertEqual([r["study_uid"] for r in self.cli_worklist(node)], self.uids(node))
        argv = [wt.itest.EXE, "worklist", "-c", "/dev/null", "--set", "store.dir=" + node.store_dir]
        p = subprocess.run(argv + ["--all", "--json"], stdout=subprocess.PIPE, check=True)
        self.assertEqual([r["study_uid"] for r in json.loads(p.stdout)],
                         ["1.9.3", "1.9.4", "1.9.5", "1.9.6", "1.9.1", "1.9.7", "1.9.2", "1.9.8"])
        p = subprocess.run(argv, stdout=subprocess.PIPE, text=True, check=True)
        self.assertIn("-- 2 older studies that need no action not shown (1 triaged, not flagged;"
                      " 1 not applicable; no new image or result for more than 7 days): --all"
                      " shows them.",
                      p.stdout)
        p = subprocess.run(argv + ["--set", "http.worklist_days=0", "--json"],
                           stdout=subprocess.PIPE, check=True)
        self.assertEqual(len(json.loads(p.stdout)), 8)

        # A study about to grow old: listed while a stream starts, and it
        # leaves with no study changing (the node notices within seconds).
        soon = int(time.time() * 1000) - 7 * 86400 * 1000 + 15000
        import sqlite3
        con = sqlite3.connect(node.db_path, timeout=10)
        with con:
            con.execute("UPDATE studies SET received_at = ?1, updated_at = ?1"
                        " WHERE study_uid = '1.9.7'", (soon,))
        con.close()
        proc, events = self.event_stream(node)
        try:
            first = events[0]["data"]
            self.assertEqual(first["order"], ["1.9.3", "1.9.4", "1.9.5", "1.9.6", "1.9.7", "1.9.8"])
            hidden = first["hidden"]
            self.assertEqual((hidden["days"], hidden["triaged"], hidden["not_applicable"]),
                             (7, 1, 1))
            deadline = time.monotonic() + 40
            while time.monotonic() < deadline and \
                    not any("1.9.7" in ev["data"]["removed"] for ev in events[1:]):
                time.sleep(0.2)
            gone = [ev["data"] for ev in events[1:] if "1.9.7" in ev["data"]["removed"]]
            self.assertTrue(gone, "1.9.7 never left the list: %r" % events[1:])
            self.assertEqual(gone[0]["hidden"]["triaged"], 2)
            self.assertEqual(gone[0]["order"], ["1.9.3", "1.9.4", "1.9.5", "1.9.6", "1.9.8"])
        finally:
            proc.kill()
            proc.wait()
        self.assertEqual(self.uids(node), ["1.9.3", "1.9.4", "1.9.5", "1.9.6", "1.9.8"])


def first_event(port, timeout=60):
    """(status, the first event's data or the error body) of GET /api/events."""
    import http.client
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request("GET", "/api/events")
        r = c.getresponse()
        if r.status != 200:
            return r.status, json.loads(r.read())
        while True:
            line = r.fp.readline().decode()
            if not line:
                return r.status, None
            if line.startswith("data: "):
                return r.status, json.loads(line[6:])
    finally:
        c.close()


class UnreadableListTest(wt.WebTest):
    def test_events_refused_while_the_list_cannot_be_read(self):
        node = node_with_studies(self, 1)
        # Another process holds the WAL index's read and write locks (bytes
        # 120-127 of the -shm file): every read of the index fails, after
        # SQLite's own retries (about 10 s), with "locking protocol".
        holder = subprocess.Popen(
            ["/usr/bin/python3", "-c",
             "import fcntl, os, sys\n"
             "fd = os.open(sys.argv[1], os.O_RDWR)\n"
             "fcntl.lockf(fd, fcntl.LOCK_EX, 8, 120)\n"
             "print('locked', flush=True)\n"
             "sys.stdin.readline()\n", node.db_path + "-shm"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            self.assertEqual(holder.stdout.readline().strip(), b"locked")
            # The stream's first event must be the whole list: without it the
            # page had nothing for later events to apply to (it was "{}").
            status, body = first_event(node.http_port)
            self.assertEqual(status, 503, body)
            self.assertIn("cannot read the worklist", body["error"])
            self.assertTrue(node.events("events_refused"), node.log_tail())
        finally:
            holder.stdin.write(b"\n")
            holder.stdin.close()
            holder.wait(30)
            holder.stdout.close()
        status, first = first_event(node.http_port)
        self.assertEqual(status, 200)
        self.assertTrue(first["full"])
        self.assertEqual([r["study_uid"] for r in first["rows"]], ["1.2.0"])


class EventStreamLimitTest(wt.WebTest):
    """Event streams are few (64): a HEAD request opens none, and one client
    (a login session; on loopback, an address) holds at most 16."""

    def streams(self, node):
        status, _, body = wt.curl(node.base + "/metrics", insecure=True)
        self.assertEqual(status, 200)
        return int(re.search(rb"^ichtriage_event_streams (\d+)$", body, re.M).group(1))

    def hold(self, argv):
        """A curl reading an event stream, once its first event came."""
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.addCleanup(lambda: (p.kill(), p.wait(), p.stdout.close()))
        while not p.stdout.readline().startswith(b"data: "):
            self.assertIsNone(p.poll(), "the stream ended before its first event")
        return p

    def test_head_opens_no_stream(self):
        node = node_with_studies(self, 1)
        for _ in range(3):
            p = subprocess.run(["curl", "-sS", "-I", "-m", "5", node.base + "/api/events"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            head = p.stdout.decode("latin-1").lower()
            self.assertTrue(head.startswith("http/1.1 405"), (head, p.stderr))
            self.assertIn("\r\nallow: get\r\n", head)
        self.assertEqual(self.streams(node), 0)

    def test_every_405_says_what_is_allowed(self):
        # RFC 9110: a 405 lists the methods the resource takes (Allow); only
        # the event stream's had one
        node = node_with_studies(self, 1)
        for method, path, allow in (("DELETE", "/healthz", "GET, HEAD"),
                                    ("POST", "/metrics", "GET, HEAD"),
                                    ("GET", "/login", "POST"),
                                    ("PUT", "/api/worklist", "GET, HEAD"),
                                    ("PUT", "/", "GET, HEAD")):
            status, headers, _ = wt.curl(node.base + path, method)
            self.assertEqual(status, 405, (method, path))
            self.assertEqual(headers.get("allow"), [allow], (method, path, headers))

    def test_streams_per_client(self):
        # Loopback: per client address.
        node = node_with_studies(self, 1)
        for _ in range(16):
            self.hold(["curl", "-sN", node.base + "/api/events"])
        self.assertEqual(self.streams(node), 16)
        status, body = first_event(node.http_port)
        self.assertEqual(status, 503, body)
        self.assertIn("from this client", body["error"])
        self.assertTrue(node.events("events_refused"), node.log_tail())
        node.stop()

        # With logins: per user, whatever their sessions (one user may hold
        # 16, and 4 of them had filled all 64); another reader is not refused.
        node = self.public_node()
        jars = [os.path.join(self.work, "jar-%d" % i) for i in range(3)]
        for jar, user in zip(jars, ("alice", "alice", "bob")):
            status, _, body = wt.curl(node.base + "/login", "POST",
                                      {"user": user, "password": user + "-pw"},
                                      cookies=jar, insecure=True)
            self.assertEqual(status, 200, body)
        for k in range(16):
            self.hold(["curl", "-skN", "-b", jars[k % 2], node.base + "/api/events"])
        self.assertEqual(self.streams(node), 16)
        for jar in jars[:2]:
            status, _, body = wt.curl(node.base + "/api/events", cookies=jar, insecure=True)
            self.assertEqual(status, 503, body)
        self.hold(["curl", "-skN", "-b", jars[2], node.base + "/api/events"])
        self.assertEqual(self.streams(node), 17)


class DegradedTest(wt.WebTest):
    def test_model_missing_is_degraded(self):
        node = self.start_node({"triage.model": os.path.join(self.work, "none.safetensors")})
        node.base = "http://127.0.0.1:%d" % node.http_port
        deadline = time.monotonic() + 10
        h = None
        while time.monotonic() < deadline:
            h = self.get_json(node, "/healthz")
            if h["degraded"]:
                break
            time.sleep(0.1)
        self.assertEqual(h["status"], "degraded")
        self.assertTrue(h["degraded"][0].startswith("model not loaded"), h)


DAY = 86400 * 1000


class RetentionApiTest(wt.WebTest):
    def test_purged_study_says_so_and_unread_flagged_or_being_read_stay(self):
        """Four studies, all flagged (threshold 0.01), old, triaged and
        delivered, with store.keep_reviewed_days 0: one reviewed, one
        flagged and not reviewed, one reviewed and then claimed, one
        reviewed and then opened. Retention removes the files of the first
        only (it had removed all four: a flagged study nobody had read lost
        its images, and so could a study open on a reader's screen), logs
        the three it keeps, and the first says so: images_removed and
        purged_at in /api/worklist, /api/studies and `ichtriage worklist`,
        410 naming the date for its slices (it had read as flagged,
        unread, 12 instances, with every slice a 404)."""
        node = self.web_node(threshold="0.01", **{"store.retention_days": 1,
                                                  "store.keep_reviewed_days": 0})
        studies = wt.phantom(os.path.join(self.work, "ph"), seed=61, count=4)
        self.send(node, [f for fs in studies.values() for f in fs])
        rows = self.wait_rows(node, list(studies))
        self.assertTrue(all(r["flagged"] for r in rows), rows)
        self.assertEqual({r["images_removed"] for r in rows}, {False})
        self.assertEqual({r["purged_at"] for r in rows}, {None})
        gone, unread, claimed, opened = sorted(studies)
        tok = "X-CSRF-Token: " + self.get_json(node, "/api/session")["csrf"]

        def post(uid, what, body, expect):
            status, _, resp = wt.curl("%s/api/studies/%s/%s" % (node.base, uid, what), "POST",
                                      body, headers=[tok])
            self.assertEqual(status, expect, resp)

        for uid in (gone, claimed, opened):
            post(uid, "review", {"hemorrhage": False}, 201)
        post(claimed, "claim", {}, 200)
        self.get_json(node, "/api/studies/" + opened)  # audited: opened now
        key_sop = node.query("SELECT r.key_sop FROM results r JOIN studies st"
                             " ON st.result_series_ref = r.series_ref WHERE st.study_uid = ?",
                             (gone,))[0][0]
        self.assertEqual(node.stop(), 0)
        import sqlite3
        con = sqlite3.connect(node.db_path)
        with con:
            old = int(time.time() * 1000) - 3 * DAY
            con.execute("UPDATE studies SET updated_at = ?, received_at = ?", (old, old))
        con.close()
        node.start()
        self.assertTrue(node.wait_event("retention_held", timeout=20, since_start=True),
                        node.log_tail())
        purged = node.events("study_purged", since_start=True)
        self.assertEqual(len(purged), 1, node.log_tail())
        held = node.events("retention_held", since_start=True)
        self.assertIn("flagged_not_reviewed=1 being_read=2", held[0])
        self.assertEqual(dict(node.query("SELECT study_uid, purged_at IS NOT NULL FROM studies")),
                         {gone: 1, unread: 0, claimed: 0, opened: 0})

        today = time.strftime("%Y-%m-%d", time.gmtime())
        rows = self.get_json(node, "/api/worklist?status=reviewed") + \
            self.get_json(node, "/api/worklist")
        by_uid = {r["study_uid"]: r for r in rows}
        self.assertEqual(set(by_uid), set(studies))
        self.assertTrue(by_uid[gone]["images_removed"])
        self.assertTrue(by_uid[gone]["purged_at"].startswith(today + "T"), by_uid[gone])
        for uid in (unread, claimed, opened):
            self.assertEqual((by_uid[uid]["images_removed"], by_uid[uid]["purged_at"]),
                             (False, None))
        st = self.get_json(node, "/api/studies/" + gone)
        self.assertEqual((st["images_removed"], st["purged_at"]),
                         (True, by_uid[gone]["purged_at"]))
        self.assertEqual(len(st["slice_probabilities"]), 12)  # the result stays
        status, _, body = wt.curl("%s/api/studies/%s/slices/%s.png" % (node.base, gone, key_sop))
        self.assertEqual(status, 410, body)
        self.assertEqual(json.loads(body)["error"], "images removed by retention on " + today)
        # The command line says it too, and the JSON is the API's.
        cli = self.cli_worklist(node, "reviewed")
        self.assertEqual({r["study_uid"]: r["purged_at"] for r in cli if r["images_removed"]},
                         {gone: by_uid[gone]["purged_at"]})
        p = subprocess.run([wt.itest.EXE, "worklist", "-c", "/dev/null", "--set",
                            "store.dir=" + node.store_dir, "--status", "reviewed"],
                           stdout=subprocess.PIPE, text=True, check=True)
        line = {u: next(l for l in p.stdout.splitlines() if u in l) for u in (gone, claimed, opened)}
        self.assertTrue(line[gone].endswith(gone + "  images removed by retention on " + today),
                        line[gone])
        self.assertNotIn("images removed", line[claimed] + line[opened])


if __name__ == "__main__":
    raise SystemExit(wt.main())

"""The worklist page in headless Chromium (issue 7): phantom studies listed
in the API's order, flagged rows marked in text, the XSS patient name shown
as text (no element, no dialog), a newly triaged study appearing live (no
reload) with a sound (or the page saying that sound is off), a new row held
back while the pointer is over the list (real pointer moves), the study
view (probability strip, key slice PNG) and a review submitted from the form
(real clicks); a study whose images retention removed; the degraded
banner; the login page over HTTPS. Screenshots
are kept in the build directory (tests/web/*.png). Skipped (77) when
Chromium is not installed. test_page_firefox.py runs the same in Firefox.

    python3 test_page.py ICHTRIAGE MAKE_TEST_MODEL"""
import json
import os
import subprocess
import time

import cdp
import webtest as wt

ARTIFACTS = os.environ.get("WEB_ARTIFACTS", os.getcwd())


class PageTest(wt.WebTest):
    """The checks, whichever browser: test_page_firefox.py runs them in
    Firefox by overriding find_browser and new_browser."""
    browser_name = "chromium"
    shot_prefix = ""  # screenshots: <build>/tests/web/<prefix>worklist.png, ...
    sound_plays = True  # headless Chromium plays into a stand-in sound device

    def find_browser(self):
        return cdp.find_chromium()

    def new_browser(self, insecure=False):
        """A started browser with a page to open; insecure: accepts the
        test's self-signed certificate."""
        return cdp.Browser(extra_args=["--ignore-certificate-errors"] if insecure else [])

    def artifact(self, name):
        return os.path.join(ARTIFACTS, self.shot_prefix + name)

    def setUp(self):
        super().setUp()
        if not self.find_browser():
            self.skipTest("%s is not installed (tools/install-deps.sh installs it)" % self.browser_name)
        self.browser = None

    def tearDown(self):
        if self.browser:
            self.browser.close()
        super().tearDown()

    def dom_order(self):
        return self.browser.eval(
            "[...document.querySelectorAll('#rows tr')].map(t => t.dataset.studyUid)")

    def live_page(self, node):
        """node's page open in a new browser, its event stream open."""
        b = self.browser = self.new_browser()
        b.open(node.base + "/")
        b.wait("state.events && state.events.readyState === 1")
        return b

    def record_notifications(self):
        """Desktop notifications as if the user had allowed them (headless
        browsers show none): window.__notes records what the page asks for."""
        self.browser.eval("window.__notes = []; window.Notification = class {"
                          " static get permission() { return 'granted'; }"
                          " constructor(title, opts) { window.__notes.push([title, opts.body]); } }")

    def new_study(self, seed):
        (uid, files), = wt.phantom(os.path.join(self.work, "new%d" % seed), seed=seed).items()
        return uid, files

    def test_page(self):
        # Threshold 0.01: every triaged study is flagged, so new ones alert.
        node = self.web_node(threshold="0.01")
        studies = wt.phantom(os.path.join(self.work, "ph"), seed=31, count=2)
        (xuid, xfiles), = wt.phantom(os.path.join(self.work, "xss"), seed=32).items()
        wt.rename(xfiles, wt.XSS_NAME)
        short = wt.phantom(os.path.join(self.work, "short"), seed=33, slices=3)
        files = [f for fs in studies.values() for f in fs] + xfiles + \
            [f for fs in short.values() for f in fs]
        self.send(node, files)
        self.wait_rows(node, list(studies) + [xuid])
        api = self.wait_rows(node, list(short), ("not_applicable",))
        api_order = [r["study_uid"] for r in api]

        b = self.browser = self.new_browser()
        b.open(node.base + "/")
        b.wait("document.querySelectorAll('#rows tr').length === 4")
        self.assertEqual(self.dom_order(), api_order)
        text = b.eval("document.body.innerText")
        self.assertIn("decision support, not a diagnosis", text.lower())
        self.assertEqual(b.eval("document.querySelectorAll('#rows tr.flagged').length"), 3)
        self.assertEqual(b.eval(
            "[...document.querySelectorAll('#rows tr.flagged')].every(t => t.innerText.includes('FLAGGED'))"),
            True)
        # The XSS name is text in its cell, not an element; no dialog opened.
        self.assertEqual(b.eval(
            "document.querySelector('#rows tr[data-study-uid=\"%s\"] td:nth-child(5)').textContent"
            % xuid), wt.XSS_NAME)
        self.assertEqual(b.eval("document.querySelectorAll('#rows img').length"), 0)
        b.screenshot(self.artifact("worklist.png"))

        # A new study appears live, without a reload, with a sound.
        b.eval("window.__no_reload = 1")
        self.record_notifications()
        beeps = int(b.eval("document.body.dataset.beeps || '0'"))
        uid1, f1 = self.new_study(34)
        self.send(node, f1)
        b.wait("!!document.querySelector('#rows tr[data-study-uid=\"%s\"].flagged')" % uid1, 40)
        self.assertEqual(b.eval("window.__no_reload"), 1)
        # The sound: a beep is counted only when it plays; where the browser
        # keeps audio suspended, the alerts button says that sound is off.
        b.wait("Number(document.body.dataset.beeps || 0) > %d || "
               "document.getElementById('notify-btn').textContent.startsWith('Sound is off')"
               % beeps, 10)
        audio = b.eval("state.audio.state")
        played = int(b.eval("document.body.dataset.beeps || '0'")) > beeps
        sound_off = b.eval("!document.getElementById('notify-btn').hidden && "
                           "document.getElementById('notify-btn').textContent.startsWith('Sound is off')")
        self.assertEqual((played, sound_off), (audio == "running", audio != "running"), audio)
        if self.sound_plays:
            self.assertEqual(audio, "running")
        notes = b.eval("window.__notes")
        self.assertEqual(len(notes), 1, notes)
        self.assertEqual(notes[0][0], "ichtriage: flagged study")
        self.assertIn("not a diagnosis", notes[0][1])
        self.assertNotIn("PHANTOM", notes[0][1])  # no patient name on the desktop
        self.assertEqual(self.dom_order(),
                         [r["study_uid"] for r in self.get_json(node, "/api/worklist")])

        # With the pointer over the list, a new row waits (nothing moves under
        # it) and comes when the pointer leaves.
        b.hover("#rows")
        before = self.dom_order()
        uid2, f2 = self.new_study(35)
        self.send(node, f2)
        b.wait("!document.getElementById('pending').hidden", 40)
        self.assertEqual(self.dom_order(), before)
        b.hover("header h1")
        b.wait("!!document.querySelector('#rows tr[data-study-uid=\"%s\"]')" % uid2, 10)

        # The study view: strip, key slice, review form.
        uid = api_order[0]
        b.eval("location.hash = '#/study/%s'" % uid)
        b.wait("document.querySelectorAll('#strip svg rect.mark-target').length === 12")
        b.wait("[...document.querySelectorAll('#slices img')].some(i => i.complete && i.naturalWidth === 64)")
        self.assertIn("test-random-weights", b.eval("document.getElementById('details').innerText"))
        self.assertIn("not a diagnosis", b.eval("document.body.innerText").lower())
        b.screenshot(self.artifact("study.png"))
        # Two slices marked as showing the bleed: the key slice's box and
        # another slice's column in the strip.
        key = b.eval("document.querySelector('#slices input[name=mark]').value")
        other = b.eval("[...document.querySelectorAll('#strip rect.mark-target')]"
                       ".map(r => r.dataset.mark).find(m => m !== %s)" % json.dumps(key))
        b.click("#slices input[name=mark]")
        b.click("#strip rect.mark-target[data-mark=%s]" % json.dumps(other))
        b.wait("document.querySelectorAll('#strip .mark-tick').length === 2")
        self.assertIn("Slices marked as showing the bleed:",
                      b.eval("document.getElementById('marks-line').textContent"))
        self.assertTrue(b.eval("document.querySelector('#slices input[name=mark]').checked"))
        b.click("input[name=hemorrhage][value=yes]")
        b.click("input[name=subtype][value=subdural]")
        b.eval("document.querySelector('textarea[name=comment]').value = 'seen in the browser'")
        b.click("#review-form button[type=submit]")
        b.wait("document.getElementById('review-msg').textContent === 'Review saved.'")
        # Opened once: the page's refresh after the review (and after each
        # update of the study) is not another opening in the audit.
        self.assertEqual(node.query("SELECT count(*) FROM audit WHERE action = 'opened'"
                                    " AND study_uid = ?", (uid,))[0][0], 1)
        st = self.get_json(node, "/api/studies/" + uid)
        self.assertEqual(st["status"], "reviewed")
        self.assertEqual([(r["reviewer"], r["subtypes"], r["comment"]) for r in st["reviews"]],
                         [("local", ["subdural"], "seen in the browser")])
        self.assertEqual(sorted("%s/%d" % (m["sop_uid"], m["frame"]) for m in st["reviews"][0]["slices"]),
                         sorted([key, other]))
        # Back on the list the reviewed study is gone (the pointer away from
        # the list, where it would hold the change back).
        b.hover("header h1")
        b.eval("location.hash = '#/'")
        b.wait("!document.querySelector('#rows tr[data-study-uid=\"%s\"]')" % uid, 10)
        self.assertEqual(b.dialogs(), [])
        self.assertEqual(b.console_errors(), [])

    FORM = ("(() => { const f = document.getElementById('review-form');"
            " return [f.hemorrhage.value,"
            " [...f.querySelectorAll('input[name=subtype]:checked')].map(c => c.value),"
            " f.comment.value, f.hidden]; })()")

    def open_study(self, uid):
        b = self.browser
        b.eval("location.hash = '#/study/%s'" % uid)
        b.wait("document.getElementById('details').innerText.includes('%s')" % uid)
        b.wait("document.querySelectorAll('#strip svg rect.mark-target').length === 12")

    def test_review_form_belongs_to_its_study(self):
        """Answers typed on study A (not saved) are gone when study B opens,
        so one click cannot store A's finding on B; a study that fails to
        load shows nothing of the previous one and no form."""
        node = self.web_node()
        studies = wt.phantom(os.path.join(self.work, "ph"), seed=36, count=2)
        self.send(node, [f for fs in studies.values() for f in fs])
        self.wait_rows(node, list(studies))
        a, b_uid = list(studies)
        b = self.browser = self.new_browser()
        b.open(node.base + "/")
        b.wait("document.querySelectorAll('#rows tr').length === 2")
        self.open_study(a)
        b.click("input[name=hemorrhage][value=yes]")
        b.click("input[name=subtype][value=subdural]")
        b.click("#slices input[name=mark]")
        b.eval("document.querySelector('textarea[name=comment]').value = 'for study A'")
        self.assertEqual(b.eval(self.FORM), ["yes", ["subdural"], "for study A", False])
        self.open_study(b_uid)
        self.assertEqual(b.eval(self.FORM), ["", [], "", False])
        self.assertEqual(b.eval("document.querySelectorAll('#strip .mark-tick').length"), 0)
        # A study that is not there: nothing of B remains under its title.
        b.eval("location.hash = '#/study/1.2.3.4'")
        b.wait("document.getElementById('study-title').textContent.startsWith('Study not found')")
        self.assertEqual(b.eval(
            "['details', 'strip', 'slices', 'reviews'].map(id => document.getElementById(id).children.length)"),
            [0, 0, 0, 0])
        self.assertTrue(b.eval("document.getElementById('review-form').hidden"))
        self.open_study(a)
        self.assertEqual(b.eval(self.FORM), ["", [], "", False])
        self.assertEqual(b.dialogs(), [])

    def test_review_before_triage_ends(self):
        """A review saved while the study's series waits for its quiet
        period: the view says by the save button that triage has not
        finished, and the flagged result that comes after the review brings
        the study back to the list, flagged and unread, with the alert. It
        had stayed reviewed, off the list, with no alert: only a series with
        instances after the review counted."""
        node = self.web_node(threshold="0.01", **{"triage.quiet_seconds": 6})
        b = self.live_page(node)
        self.record_notifications()
        uid, files = self.new_study(41)
        self.send(node, files)
        b.eval("location.hash = '#/study/%s'" % uid)
        note = b.wait("!document.getElementById('review-pending').hidden && "
                      "document.getElementById('review-pending').textContent")
        self.assertIn("Triage has not finished", note)
        b.click("input[name=hemorrhage][value=no]")
        b.click("#review-form button[type=submit]")
        b.wait("document.getElementById('review-msg').textContent === 'Review saved.'")
        b.hover("header h1")
        b.eval("location.hash = '#/'")
        b.wait("!!document.querySelector('#rows tr[data-study-uid=\"%s\"].flagged')" % uid, 40)
        (reviewed, result), = node.query(
            "SELECT st.reviewed_at, r.created_at FROM studies st JOIN series s"
            " ON s.study_ref = st.id JOIN results r ON r.series_ref = s.id")
        self.assertLess(reviewed, result, "the result came before the review")
        row, = [r for r in self.get_json(node, "/api/worklist") if r["study_uid"] == uid]
        self.assertEqual((row["status"], row["flagged"]), ("triaged", True))
        b.wait("window.__notes.length === 1")
        self.assertEqual(b.dialogs(), [])
        self.assertEqual(b.console_errors(), [])

    def test_review_by_another_reader_while_open(self):
        """A study open on this page is reviewed by another reader: the view
        shows that review at once (the study left the list, and only studies
        in an event's rows were reloaded), and saving this reader's review
        is refused with that review named, the answers kept; saved again, it
        is stored beside it. The second review had silently replaced the
        first as the study's label."""
        node = self.web_node()
        (uid, files), = wt.phantom(os.path.join(self.work, "ph"), seed=42).items()
        self.send(node, files)
        self.wait_rows(node, [uid])
        b = self.live_page(node)
        self.open_study(uid)
        b.click("input[name=hemorrhage][value=no]")
        b.eval("document.querySelector('textarea[name=comment]').value = 'B: nothing'")
        csrf = self.get_json(node, "/api/session")["csrf"]
        status, _, body = wt.curl("%s/api/studies/%s/review" % (node.base, uid), "POST",
                                  {"hemorrhage": True, "subtypes": ["subdural"],
                                   "comment": "A: SDH left"}, headers=["X-CSRF-Token: " + csrf])
        self.assertEqual(status, 201, body)
        b.wait("document.getElementById('reviews').innerText.includes('A: SDH left')", 10)
        b.click("#review-form button[type=submit]")
        msg = b.wait("document.getElementById('review-msg').textContent")
        self.assertTrue(msg.startswith("Not saved: local reviewed this study at"), msg)
        self.assertIn("(hemorrhage: subdural)", msg)
        self.assertEqual(b.eval(self.FORM), ["no", [], "B: nothing", False])
        self.assertEqual(len(self.get_json(node, "/api/studies/" + uid)["reviews"]), 1)
        b.click("#review-form button[type=submit]")
        b.wait("document.getElementById('review-msg').textContent === 'Review saved.'")
        st = self.get_json(node, "/api/studies/" + uid)
        self.assertEqual([r["comment"] for r in st["reviews"]], ["A: SDH left", "B: nothing"])
        self.assertEqual(b.dialogs(), [])
        self.assertEqual(b.console_errors(), [])

    def test_silent_stream_shows_the_banner_and_recovers(self):
        """The path to the node goes silent with no FIN or RST (a proxy
        stopped with SIGSTOP: as a NAT change or a laptop's sleep leave it):
        the page hears no ping for 35 s, shows its offline banner and
        reconnects; once the path works again the list is live, with the
        study stored meanwhile. The keep-alive was a comment, which
        EventSource hands to no page, and the page had no watchdog: the list
        stayed stale for ever, the stream "open", no banner."""
        import signal
        node = self.web_node()
        uid0, files0 = self.new_study(43)
        self.send(node, files0)
        self.wait_rows(node, [uid0])
        port = wt.dt.free_port()
        proxy = subprocess.Popen(["/usr/bin/python3", os.path.join(wt.HERE, "tcpproxy.py"),
                                  str(port), str(node.http_port)], stdout=subprocess.PIPE)
        self.addCleanup(proxy.stdout.close)
        self.addCleanup(proxy.wait)
        self.addCleanup(proxy.kill)
        self.addCleanup(os.kill, proxy.pid, signal.SIGCONT)
        self.assertEqual(proxy.stdout.readline(), b"ready\n")
        b = self.browser = self.new_browser()
        b.open("http://127.0.0.1:%d/" % port)
        b.wait("document.querySelectorAll('#rows tr').length === 1")
        b.wait("state.events && state.events.readyState === 1")
        os.kill(proxy.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        uid1, files1 = self.new_study(44)
        self.send(node, files1)
        self.wait_rows(node, [uid1])
        b.wait("!document.getElementById('offline').hidden", 50)
        self.assertGreater(time.monotonic() - stopped, 15)  # not a false alarm
        self.assertFalse(b.eval("!!document.querySelector('#rows tr[data-study-uid=\"%s\"]')"
                                % uid1))
        os.kill(proxy.pid, signal.SIGCONT)
        b.wait("!!document.querySelector('#rows tr[data-study-uid=\"%s\"]')" % uid1, 40)
        b.wait("document.getElementById('offline').hidden && state.events &&"
               " state.events.readyState === 1")
        self.assertEqual(b.console_errors(), [])

    def test_key_slice_of_a_multi_frame_series(self):
        """An Enhanced CT (one instance, every frame a slice, one SOP
        Instance UID): the key slice shown, its caption and its "bleed
        visible here" box are the key frame's. The page found the key slice
        by SOP UID alone: it showed frame 0 as the key slice, and ticking its
        box marked frame 0 for retraining."""
        import pydicom
        # Model seed 2 puts the key slice of this series at frame 7 (seed 1
        # at frame 0, where the page's mistake would not show).
        node = self.web_node(model_seed="2")
        (enh,) = self.gen("enh", count=12, rows=64, cols=64, sop="enhanced-ct", seed=1)
        uid = str(pydicom.dcmread(enh, stop_before_pixels=True).StudyInstanceUID)
        self.send(node, [enh])
        self.wait_rows(node, [uid])
        st = self.get_json(node, "/api/studies/" + uid)
        key = st["slice_probabilities"][st["key_index"]]
        self.assertEqual(key["sop_uid"], st["key_sop_uid"])
        self.assertNotEqual(key["frame"], 0, "the test needs a key slice other than frame 0")
        b = self.live_page(node)
        self.open_study(uid)
        b.wait("document.querySelectorAll('#slices figure').length === 3")
        want = "%s/%d" % (key["sop_uid"], key["frame"])
        shown, caption = self.figures()[0]
        self.assertEqual((shown, caption), (want, "key slice %d of %d (image %d, frame %d): %.0f%%" % (
            st["key_index"] + 1, len(st["slice_probabilities"]), key["instance_number"],
            key["frame"] + 1, 100 * key["any"])))
        b.click("#slices input[name=mark]")
        b.click("input[name=hemorrhage][value=yes]")
        b.click("#review-form button[type=submit]")
        b.wait("document.getElementById('review-msg').textContent === 'Review saved.'")
        marked = self.get_json(node, "/api/studies/" + uid)["reviews"][0]["slices"]
        self.assertEqual(marked, [{"sop_uid": key["sop_uid"], "frame": key["frame"]}])
        self.assertEqual(b.console_errors(), [])

    def test_claim_that_fails_says_so(self):
        """A claim the node cannot store (its index locked by another
        process: 500 after the loop's 1 s of retries) says so by the claim
        button; it had been ignored, the page as if nothing was clicked."""
        node = self.web_node()
        uid, files = self.new_study(45)
        self.send(node, files)
        self.wait_rows(node, [uid])
        b = self.live_page(node)
        self.open_study(uid)
        with wt.itest.database_locked(node.db_path, "BEGIN IMMEDIATE"):
            b.click("#claim-btn")
            msg = b.wait("document.getElementById('claim-msg').textContent", 40)
        self.assertEqual(msg, "Not claimed: cannot store the claim")
        self.assertEqual(self.get_json(node, "/api/studies/" + uid)["claimed_by"], "")
        b.click("#claim-btn")
        b.wait("document.getElementById('claimed').textContent === 'local'")
        self.assertEqual(b.eval("document.getElementById('claim-msg').textContent"), "")

    def test_open_study_keeps_its_claim(self):
        """A claim lapses http.claim_minutes (here 1) after it was made or
        renewed; the page renews it while the study is open (every third of
        that), so the reader keeps it past the first minute, and once the
        study is closed it lapses, the list saying nobody reads it without
        any other change to the row. The node's wall clock is stepped
        (clockstep) past the minute rather than waited for."""
        env, step_clock = self.clock_step()
        node = self.web_node(env=env, **{"http.claim_minutes": "1"})
        uid, files = self.new_study(46)
        self.send(node, files)
        self.wait_rows(node, [uid])
        b = self.live_page(node)
        self.open_study(uid)
        b.click("#claim-btn")
        b.wait("document.getElementById('claimed').textContent === 'local'")
        (first,), = node.query("SELECT claimed_at FROM claims")
        deadline = time.monotonic() + 30
        renewed = first
        while renewed == first and time.monotonic() < deadline:
            time.sleep(0.2)
            (renewed,), = node.query("SELECT claimed_at FROM claims")
        self.assertGreater(renewed, first, "the open study's claim was not renewed in 30 s")
        step_clock(45)  # now about 65 s after the claim, 45 s after its renewal
        self.assertEqual(self.get_json(node, "/api/studies/" + uid)["claimed_by"], "local")
        self.assertEqual(node.query("SELECT count(*) FROM audit WHERE action = 'claimed'")[0][0], 1)
        # Closed: no more renewals, and the lapse reaches the list by itself.
        b.eval("location.hash = '#/'")
        cell = ("document.querySelector('#rows tr[data-study-uid=\"%s\"] td:nth-child(12)')"
                ".textContent" % uid)
        b.wait(cell + " === 'local'")
        step_clock(200)
        b.wait(cell + " === ''", 15)
        self.assertEqual(self.get_json(node, "/api/studies/" + uid)["claimed_by"], "")
        self.assertEqual(b.console_errors(), [])

    def test_slices_marked_from_the_keyboard(self):
        """The probability strip works from the keyboard alone: Tab reaches
        it (a focus outline), arrow keys and Home move a cursor from slice
        to slice and show that slice below, Space and Enter mark or unmark
        it, and the strip says so to assistive technology (a multi-select
        list whose active option is named by slice, image and probability,
        aria-selected when marked). The marks go with the review. Only a
        mouse click had marked a slice."""
        node = self.web_node()
        uid, files = self.new_study(48)
        self.send(node, files)
        self.wait_rows(node, [uid])
        st = self.get_json(node, "/api/studies/" + uid)
        sl = st["slice_probabilities"]
        b = self.live_page(node)
        self.open_study(uid)
        strip = "document.querySelector('#strip svg')"
        for _ in range(80):
            if b.eval("document.activeElement === %s" % strip):
                break
            b.key("Tab")
        self.assertTrue(b.eval("document.activeElement === %s" % strip),
                        "Tab never reached the strip")
        # The focus is seen (headless Firefox gives its window no focus, so
        # nothing there matches :focus; Chromium does).
        if b.eval("document.hasFocus()"):
            self.assertEqual(b.eval("getComputedStyle(%s).outlineStyle" % strip), "solid")
        self.assertEqual(b.eval("[%s.getAttribute('role'), %s.getAttribute('aria-multiselectable')]"
                                % (strip, strip)), ["listbox", "true"])
        active = ("(() => { const s = %s; const o = document.getElementById("
                  "s.getAttribute('aria-activedescendant'));"
                  " return o && [o.getAttribute('role'), o.getAttribute('aria-label'),"
                  " o.getAttribute('aria-selected'), o.dataset.mark]; })()" % strip)

        def name(i):
            s = sl[i]
            return "slice %d of %d (image %d): %.0f%%" % (i + 1, len(sl), s["instance_number"],
                                                         100 * s["any"])

        def key_of(i):
            return "%s/%d" % (sl[i]["sop_uid"], sl[i]["frame"])
        b.key("Home")
        self.assertEqual(b.eval(active), ["option", name(0), "false", key_of(0)])
        b.key("ArrowRight")
        b.key("ArrowRight")
        self.assertEqual(b.eval(active), ["option", name(2), "false", key_of(2)])
        # The slice under the cursor is shown below the strip.
        self.assertEqual(b.wait("(() => { const f = document.getElementById('strip-slice');"
                                " const i = f.querySelector('img');"
                                " return !f.hidden && i.complete && i.naturalWidth > 0 &&"
                                " [decodeURIComponent(i.getAttribute('src').split('/slices/')[1])"
                                "  .replace('.png?frame=', '/'),"
                                "  f.querySelector('figcaption').textContent]; })()"),
                         [key_of(2), name(2) + " \u2014 not marked"])
        b.key(" ")
        self.assertEqual(b.eval(active), ["option", name(2) + ", marked: bleed visible", "true",
                                          key_of(2)])
        b.key("ArrowRight")
        b.key("Enter")
        b.key("Enter")  # and unmarked again
        b.key("ArrowRight")
        b.key("Enter")
        self.assertEqual(b.eval(active)[1:3], [name(4) + ", marked: bleed visible", "true"])
        self.assertTrue(b.eval("document.activeElement === %s" % strip), "the strip lost the focus")
        self.assertEqual(b.eval("document.querySelectorAll('#strip .mark-tick').length"), 2)
        self.assertEqual(b.eval("[...document.querySelectorAll('#strip [role=option]')]"
                                ".filter(o => o.getAttribute('aria-selected') === 'true')"
                                ".map(o => o.dataset.mark)"), [key_of(2), key_of(4)])
        self.assertEqual(b.eval("document.getElementById('marks-line').textContent"),
                         "Slices marked as showing the bleed: 3, 5")
        b.screenshot(self.artifact("study-keyboard.png"))
        b.click("input[name=hemorrhage][value=yes]")
        b.click("#review-form button[type=submit]")
        b.wait("document.getElementById('review-msg').textContent === 'Review saved.'")
        st = self.get_json(node, "/api/studies/" + uid)
        self.assertEqual(sorted("%s/%d" % (m["sop_uid"], m["frame"]) for m in st["reviews"][0]["slices"]),
                         sorted([key_of(2), key_of(4)]))
        self.assertEqual(b.console_errors(), [])

    @staticmethod
    def series_of(path):
        import pydicom
        return str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)

    def predict(self, paths):
        """{series_uid: p_any} from `ichtriage predict` with the node's model."""
        p = subprocess.run([wt.itest.EXE, "predict", "-c", "/dev/null", "--set",
                            "triage.model=" + self.make_model(), "--json"] + paths,
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, check=True)
        return {r["series_uid"]: r["probability"] for r in json.loads(p.stdout)}

    def figures(self):
        """(sop/frame of each key slice image, its caption) as the page shows them."""
        return self.browser.eval(
            "[...document.querySelectorAll('#slices figure')].map(f => ["
            " decodeURIComponent(f.querySelector('img').getAttribute('src').split('/slices/')[1])"
            "  .replace('.png?frame=', '/'),"
            " f.querySelector('figcaption').textContent])")

    def test_key_slices_follow_the_result_series(self):
        """An open study whose result moves to another series (another
        reconstruction, with a higher p(ICH)) shows that series' key slices,
        and a slice marked on the old series is no longer marked: the page
        had kept the old images, captions and boxes (the count of key
        slices was the same), and a tick would mark an old slice."""
        node = self.web_node()
        (uid, files), = wt.phantom(os.path.join(self.work, "ph"), seed=39).items()
        # Another series of the study, its slices all air, so that the model
        # gives it another probability (the test model's random weights
        # barely tell a flipped or brightened copy from the original).
        air_series, air = wt.test_triage.another_series(files, os.path.join(self.work, "air"),
                                                        lambda a: a * 0)
        series = {self.series_of(files[0]): files, air_series: air}
        p = self.predict([os.path.join(self.work, "ph"), os.path.join(self.work, "air")])
        self.assertEqual(set(p), set(series))
        # The lower one first: the higher one, second, becomes the result.
        first, second = sorted(series, key=p.get)
        self.assertGreater(p[second] - p[first], 1e-5, p)
        self.send(node, series[first])
        self.wait_rows(node, [uid])
        b = self.browser = self.new_browser()
        b.open(node.base + "/")
        self.open_study(uid)
        old = self.get_json(node, "/api/studies/" + uid)
        self.assertEqual(old["series_uid"], first)
        b.wait("document.querySelectorAll('#slices figure').length === 3")
        b.click("#slices input[name=mark]")
        b.wait("document.querySelectorAll('#strip .mark-tick').length === 1")

        self.send(node, series[second])
        deadline = time.monotonic() + 40
        while self.get_json(node, "/api/studies/" + uid)["series_uid"] != second:
            self.assertLess(time.monotonic(), deadline, node.log_tail())
            time.sleep(0.2)
        b.wait("document.getElementById('details').innerText.includes(%s)" % json.dumps(second),
               20)
        st = self.get_json(node, "/api/studies/" + uid)
        by_key = {"%s/%d" % (s["sop_uid"], s["frame"]): s for s in st["slice_probabilities"]}
        shown = self.figures()
        self.assertEqual(len(shown), 3)
        self.assertEqual([k for k, _ in shown if k not in by_key], [],
                         "key slices not of the result's series shown")
        for key, caption in shown:
            s = by_key[key]
            self.assertTrue(caption.endswith("slice %d of 12 (image %d): %.0f%%" % (
                s["index"] + 1, s["instance_number"], 100 * s["any"])), caption)
        self.assertEqual(shown[0][0], "%s/0" % st["key_sop_uid"])
        self.assertEqual(b.eval("state.marks.size"), 0)
        self.assertTrue(b.eval("document.getElementById('marks-line').textContent")
                        .startswith("No slice marked"))
        self.assertEqual(b.console_errors(), [])

    def test_series_named_in_the_row_and_the_view(self):
        """A flagged study with a 3-image "SCOUT" series beside the one that
        set the result: the row's status names the scout as the series the
        reason is about, and the study view lists every series (number,
        description, images, state, reason) and names the result series by
        its description. The row had read "triaged (3 axial slices, fewer
        than triage.min_slices=5)" under the flag, and the view showed the
        result series as a bare UID and no other series."""
        node = self.web_node(threshold="0.01")
        (uid, files), = wt.phantom(os.path.join(self.work, "ph"), seed=41).items()
        scout, sfiles = wt.test_triage.another_series(
            files[:3], os.path.join(self.work, "scout"), number=1, description="SCOUT")
        self.send(node, files + sfiles)
        deadline = time.monotonic() + 40
        while True:
            self.wait_rows(node, [uid])
            st = self.get_json(node, "/api/studies/" + uid)
            if [s["state"] for s in st["series"]] == ["not_applicable", "triaged"]:
                break
            self.assertLess(time.monotonic(), deadline, node.log_tail())
            time.sleep(0.2)
        desc = next(s["description"] for s in st["series"] if s["series_uid"] == st["series_uid"])
        b = self.browser = self.new_browser()
        b.open(node.base + "/")
        row = "document.querySelector('#rows tr[data-study-uid=\"%s\"]')" % uid
        b.wait("!!%s" % row)
        text = b.eval(row + ".innerText")
        self.assertIn("FLAGGED", text)
        self.assertIn("triaged (SCOUT: 3 axial slices, fewer than triage.min_slices=5)", text)
        self.open_study(uid)
        shown = b.eval("[...document.querySelectorAll('#series-rows tr')].map(t =>"
                       " [...t.cells].map(c => c.innerText.trim()))")
        self.assertEqual(shown, [
            ["1", "SCOUT", "3", "not applicable", "3 axial slices, fewer than triage.min_slices=5"],
            ["2", desc, "12", "triaged result", ""]], shown)
        self.assertEqual(b.eval("document.querySelector('#series-rows tr.result')"
                                ".dataset.seriesUid"), st["series_uid"])
        details = b.eval("document.getElementById('details').innerText")
        self.assertIn("%s (series 2) \u2014 %s" % (desc, st["series_uid"]), details)
        b.screenshot(self.artifact("study-series.png"))
        self.assertEqual(b.console_errors(), [])

    def test_strip_runs_from_foot_to_head_and_names_images(self):
        """The strip says, in its label and at its ends, that it runs from
        the feet (left) to the head (right), and each slice, in the strip's
        tooltips and the key slices' captions, is named by its place and by
        the image number PACS shows (here numbered from the head). The label
        had said "head to foot" with no visible end, and captions gave the
        position alone ("key slice 1")."""
        node = self.web_node()
        (uid, files), = wt.phantom(os.path.join(self.work, "ph"), seed=42).items()
        wt.head_first(files)
        self.send(node, files)
        self.wait_rows(node, [uid])
        b = self.browser = self.new_browser()
        b.open(node.base + "/")
        self.open_study(uid)
        self.assertEqual(b.eval("document.querySelector('#strip svg').getAttribute('aria-label')"),
                         "probability of hemorrhage per slice, from the feet (left) to the head"
                         " (right)")
        ends = b.eval("['.end-foot', '.end-head'].map(c => {"
                      " const t = document.querySelector('#strip svg ' + c);"
                      " return [t.textContent, t.getBoundingClientRect().x]; })")
        self.assertIn("foot", ends[0][0])
        self.assertIn("head", ends[1][0])
        self.assertLess(ends[0][1], ends[1][1])
        titles = b.eval("[...document.querySelectorAll('#strip rect.mark-target title')]"
                        ".map(t => t.textContent.split(':')[0])")
        self.assertEqual(titles, ["slice %d of 12 (image %d)" % (i + 1, 12 - i) for i in range(12)])
        b.wait("document.querySelectorAll('#slices figure').length === 3")
        st = self.get_json(node, "/api/studies/" + uid)
        by_key = {"%s/%d" % (s["sop_uid"], s["frame"]): s for s in st["slice_probabilities"]}
        shown = self.figures()
        for n, (key, caption) in enumerate(shown):
            s = by_key[key]
            self.assertEqual(caption, "%sslice %d of 12 (image %d): %.0f%%" % (
                "key " if n == 0 else "", s["index"] + 1, 12 - s["index"], 100 * s["any"]))
        b.screenshot(self.artifact("study-strip.png"))
        self.assertEqual(b.console_errors(), [])

    def test_study_date_prior_and_local_times(self):
        """The list shows each study's date beside its arrival and marks a
        study dated more than 2 days before it arrived as "prior"; the view
        shows the date readably, and arrival and review times in the
        browser's time zone (here Asia/Kathmandu, UTC+05:45). The list had
        only "Arrived", so an old study sent again looked new, and the view
        showed "20201212 112341" and UTC ISO strings."""
        import datetime
        node = self.web_node()
        (old, ofiles), = wt.phantom(os.path.join(self.work, "old"), seed=43).items()
        (new, nfiles), = wt.phantom(os.path.join(self.work, "new"), seed=44).items()
        made = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0) - \
            datetime.timedelta(hours=1)
        wt.date_study(ofiles, made - datetime.timedelta(days=400))
        wt.date_study(nfiles, made)
        self.send(node, ofiles + nfiles)
        rows = {r["study_uid"]: r for r in self.wait_rows(node, [old, new])}
        saved = os.environ.get("TZ")
        os.environ["TZ"] = "Asia/Kathmandu"
        try:
            b = self.browser = self.new_browser()
        finally:
            if saved is None:
                del os.environ["TZ"]
            else:
                os.environ["TZ"] = saved
        b.open(node.base + "/")
        b.wait("document.querySelectorAll('#rows tr').length === 2")
        zone = datetime.timezone(datetime.timedelta(hours=5, minutes=45))

        def local(iso):
            t = datetime.datetime.fromisoformat(iso.replace("Z", "+00:00"))
            return t.astimezone(zone).strftime("%Y-%m-%d %H:%M")
        header = b.eval("[...document.querySelectorAll('#worklist thead th')].map(t => t.textContent)")
        col = header.index("Study date") + 1
        cell = "document.querySelector('#rows tr[data-study-uid=\"%s\"] td:nth-child(%d)')"
        for uid, when, prior in ((old, made - datetime.timedelta(days=400), True),
                                 (new, made, False)):
            text = b.eval((cell % (uid, col)) + ".innerText")
            self.assertEqual(text.split()[:2], when.strftime("%Y-%m-%d %H:%M").split(), text)
            self.assertEqual("prior" in text, prior, text)
            self.assertEqual(b.eval((cell % (uid, col + 1)) + ".querySelector('.age').title"),
                             local(rows[uid]["received_at"]))
        self.open_study(old)
        details = b.eval("document.getElementById('details').innerText")
        when = (made - datetime.timedelta(days=400)).strftime("%Y-%m-%d %H:%M")
        self.assertIn("Study date\n%s \u2014 prior:" % when, details)
        self.assertIn("Arrived\n%s (" % local(rows[old]["received_at"]), details)
        self.assertNotIn("Z (", details)
        b.click("input[name=hemorrhage][value=no]")
        b.click("#review-form button[type=submit]")
        b.wait("document.getElementById('review-msg').textContent === 'Review saved.'")
        review = self.get_json(node, "/api/studies/" + old)["reviews"][0]
        b.wait("document.querySelectorAll('#reviews li').length === 1")
        self.assertTrue(b.eval("document.querySelector('#reviews li').textContent")
                        .startswith(local(review["created_at"]) + " local: no hemorrhage"))
        b.screenshot(self.artifact("worklist-dates.png"))
        self.assertEqual(b.console_errors(), [])

    def test_malformed_study_link(self):
        """A study link that does not decode (a cut "%E0%A4%A") is a study
        not found, and the list is live when the reader goes back to it: the
        page had thrown before opening its event stream, and the list stayed
        empty with no event stream and no banner."""
        node = self.web_node()
        uid, files = self.new_study(40)
        self.send(node, files)
        self.wait_rows(node, [uid])
        b = self.browser = self.new_browser()
        b.open(node.base + "/#/study/%E0%A4%A")
        b.wait("document.getElementById('study-title').textContent.startsWith('Study not found')")
        self.assertTrue(b.eval("document.getElementById('review-form').hidden"))
        b.eval("location.hash = '#/'")
        b.wait("document.querySelectorAll('#rows tr').length === 1")
        b.wait("state.events && state.events.readyState === 1")
        self.assertTrue(b.eval("document.getElementById('offline').hidden"))
        self.assertEqual(b.console_errors(), [])

    def test_node_restart_under_open_page(self):
        """The node restarts (a new CSRF token) under an open page: a study
        stored afterwards appears live, and a review saved from the form is
        accepted (the page renews its session on the refused POST)."""
        node = self.web_node(threshold="0.01")
        (uid0, files0), = wt.phantom(os.path.join(self.work, "ph"), seed=37).items()
        self.send(node, files0)
        self.wait_rows(node, [uid0])
        b = self.browser = self.new_browser()
        b.open(node.base + "/")
        b.wait("document.querySelectorAll('#rows tr').length === 1")
        b.wait("state.events && state.events.readyState === 1")
        csrf = b.eval("state.session.csrf")
        b.eval("window.__no_reload = 1")
        node.stop()
        node.start()
        uid1, f1 = self.new_study(38)
        self.send(node, f1)
        b.wait("!!document.querySelector('#rows tr[data-study-uid=\"%s\"].flagged')" % uid1, 40)
        self.assertEqual(b.eval("window.__no_reload"), 1)
        self.open_study(uid1)
        b.click("input[name=hemorrhage][value=no]")
        b.click("#review-form button[type=submit]")
        b.wait("document.getElementById('review-msg').textContent !== ''")
        self.assertEqual(b.eval("document.getElementById('review-msg').textContent"), "Review saved.")
        self.assertNotEqual(b.eval("state.session.csrf"), csrf)
        st = self.get_json(node, "/api/studies/" + uid1)
        self.assertEqual(st["status"], "reviewed")

    def test_lost_session_shows_login(self):
        """With logins, a node restart ends every session: the page's event
        stream is refused (401, EventSource closed for good), and the page
        shows the login form instead of a frozen list; after logging in
        again the list is live."""
        node = self.public_node()
        b = self.browser = self.new_browser(insecure=True)
        b.open(node.base + "/")
        b.wait("!document.getElementById('login-view').hidden")

        def login():
            b.eval("(() => { const f = document.getElementById('login-form');"
                   " f.user.value = 'alice'; f.password.value = 'alice-pw';"
                   " f.querySelector('button').click(); })()")
        login()
        b.wait("!document.getElementById('list-view').hidden")
        b.wait("state.events && state.events.readyState === 1")
        node.stop()
        node.start()
        b.wait("!document.getElementById('login-view').hidden && "
               "document.getElementById('list-view').hidden", 40)
        login()
        b.wait("!document.getElementById('list-view').hidden")
        b.wait("state.events && state.events.readyState === 1 && "
               "document.getElementById('offline').hidden")

    def test_study_whose_images_retention_removed(self):
        """A study whose files retention removed says so in its row and its
        view, and the view asks for no slice image: it had stayed a plain
        row, and its view showed the key slices as broken images (each a
        404, "no such slice in this study")."""
        node = self.web_node(threshold="0.999", **{"store.retention_days": 1})
        studies = wt.phantom(os.path.join(self.work, "ph"), seed=63, count=2)
        self.send(node, [f for fs in studies.values() for f in fs])
        rows = self.wait_rows(node, list(studies))
        self.assertFalse(any(r["flagged"] for r in rows), rows)  # flagged ones stay until read
        gone, kept = sorted(studies)
        self.assertEqual(node.stop(), 0)
        import sqlite3
        con = sqlite3.connect(node.db_path)
        with con:
            old = int(time.time() * 1000) - 3 * 86400 * 1000
            con.execute("UPDATE studies SET updated_at = ?, received_at = ? WHERE study_uid = ?",
                        (old, old, gone))
        con.close()
        node.start()
        self.assertTrue(node.wait_event("study_purged", timeout=20, since_start=True),
                        node.log_tail())
        today = time.strftime("%Y-%m-%d", time.gmtime())

        b = self.browser = self.new_browser()
        b.open(node.base + "/")
        b.wait("document.querySelectorAll('#rows tr').length === 2")
        row = "document.querySelector('#rows tr[data-study-uid=\"%s\"]').innerText"
        self.assertIn("images removed by retention on " + today, b.eval(row % gone))
        self.assertNotIn("images removed", b.eval(row % kept))
        self.open_study(gone)
        b.wait("!document.getElementById('study-purged').hidden")
        self.assertTrue(b.eval("document.getElementById('study-purged').textContent")
                        .startswith("Images removed by retention on " + today))
        self.assertEqual(b.eval("document.querySelectorAll('#slices img').length"), 0)
        self.assertIn("No images: images removed by retention on " + today,
                      b.eval("document.getElementById('slices').innerText"))
        # The result stays: the strip of per-slice probabilities.
        self.assertEqual(b.eval("document.querySelectorAll('#strip svg rect.mark-target').length"),
                         12)
        b.screenshot(self.artifact("purged-study.png"))
        # The other study, opened after it, shows its images and no notice.
        self.open_study(kept)
        b.wait("[...document.querySelectorAll('#slices img')].some(i => i.complete && i.naturalWidth === 64)")
        self.assertTrue(b.eval("document.getElementById('study-purged').hidden"))
        self.assertEqual(b.eval(
            "performance.getEntriesByType('resource').filter(e => e.name.includes('%s/slices/'))"
            ".length" % gone), 0)
        self.assertEqual(b.console_errors(), [])

    def test_older_studies_left_out_said_and_shown_on_request(self):
        """The open list leaves out studies that need no action that are
        older than http.worklist_days (7): the page says how many, of which
        status, and "Show them" lists them (the "older" view); back on open
        studies they are gone again and the note is back. The page had
        listed every study until it was reviewed, and had no such note."""
        node = self.node_with_rows(wt.AGE_WINDOW_ROWS)
        b = self.live_page(node)
        b.wait("document.querySelectorAll('#rows tr').length === 6")
        self.assertEqual(self.dom_order(), ["1.9.3", "1.9.4", "1.9.5", "1.9.6", "1.9.7", "1.9.8"])
        b.wait("!document.getElementById('older').hidden")
        text = b.eval("document.getElementById('older').innerText")
        self.assertTrue(text.startswith("2 older studies not shown (1 triaged, not flagged, 1 not"
                                        " applicable; no new image or result for more than 7 days, since"
                                        " before "), text)
        self.assertIn("Show them", text)
        b.screenshot(self.artifact("older-note.png"))
        b.click("#show-older")
        b.wait("document.querySelectorAll('#rows tr').length === 2")
        self.assertEqual(self.dom_order(), ["1.9.1", "1.9.2"])
        self.assertEqual(b.eval("document.getElementById('status-filter').value"), "older")
        self.assertTrue(b.eval("document.getElementById('older').hidden"))
        b.eval("const f = document.getElementById('status-filter'); f.value = '';"
               " f.dispatchEvent(new Event('change'))")
        b.wait("document.querySelectorAll('#rows tr').length === 6 && "
               "!document.getElementById('older').hidden")
        self.assertEqual(self.dom_order(), ["1.9.3", "1.9.4", "1.9.5", "1.9.6", "1.9.7", "1.9.8"])
        self.assertEqual(b.console_errors(), [])

    def test_long_list_drawn_in_steps(self):
        """A long list draws its first 200 rows, in the API's order, and says
        how many there are; "Show 200 more" draws the next ones, until all
        are. The page had drawn every row at once (8,000 rows: seconds of
        layout before anything showed)."""
        node = self.node_with_rows([("1.7.%d" % i, "triaged", 0, (i % 89) / 89, 3600000 - i)
                                    for i in range(450)])
        api = [r["study_uid"] for r in self.get_json(node, "/api/worklist")]
        b = self.live_page(node)
        b.wait("document.querySelectorAll('#rows tr').length === 200")
        self.assertEqual(self.dom_order(), api[:200])
        self.assertEqual(b.eval("document.getElementById('count').textContent"),
                         "450 studies (the first 200 shown)")
        self.assertEqual(b.eval("document.getElementById('more').innerText"),
                         "Showing the first 200 of 450 studies. Show 200 more")
        b.click("#more-btn")
        b.wait("document.querySelectorAll('#rows tr').length === 400")
        self.assertEqual(b.eval("document.getElementById('more-btn').textContent"), "Show 50 more")
        b.click("#more-btn")
        b.wait("document.querySelectorAll('#rows tr').length === 450")
        self.assertEqual(self.dom_order(), api)
        self.assertTrue(b.eval("document.getElementById('more').hidden"))
        self.assertEqual(b.eval("document.getElementById('count').textContent"), "450 studies")
        self.assertEqual(b.console_errors(), [])

    def test_degraded_banner(self):
        node = self.start_node({"triage.model": os.path.join(self.work, "none.safetensors")})
        b = self.browser = self.new_browser()
        b.open("http://127.0.0.1:%d/" % node.http_port)
        text = b.wait("!document.getElementById('degraded').hidden && "
                      "document.getElementById('degraded').textContent")
        self.assertIn("model not loaded", text)
        self.assertEqual(b.console_errors(), [])

    def test_login_page(self):
        node = self.public_node()
        b = self.browser = self.new_browser(insecure=True)
        b.open(node.base + "/")
        b.wait("!document.getElementById('login-view').hidden")
        self.assertTrue(b.eval("document.getElementById('list-view').hidden"))

        def login(user, password):
            b.eval("(() => { const f = document.getElementById('login-form');"
                   " f.user.value = %r; f.password.value = %r;"
                   " f.querySelector('button').click(); })()" % (user, password))
        login("alice", "wrong")
        b.wait("document.getElementById('login-error').textContent.includes('wrong user or password')")
        login("alice", "alice-pw")
        b.wait("!document.getElementById('list-view').hidden")
        self.assertEqual(b.eval("document.getElementById('who').textContent"), "alice")
        self.assertEqual(b.eval("document.cookie"), "")  # HttpOnly: not visible to scripts
        b.wait("document.getElementById('offline').hidden")  # the event stream is open
        b.screenshot(self.artifact("login.png"))
        b.eval("document.getElementById('logout-btn').click()")
        b.wait("!document.getElementById('login-view').hidden && "
               "document.getElementById('list-view').hidden")
        self.assertEqual(b.console_errors(), [])


if __name__ == "__main__":
    raise SystemExit(wt.main())

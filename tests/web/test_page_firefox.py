"""The worklist page in headless Firefox (issue 7: "works in current
Chromium and Firefox"): every check of test_page.py (order, flagged rows,
the XSS name as text, live rows over server-sent events with sound and
notification, the study view and a review, the degraded banner, the login
page over HTTPS), driven over WebDriver BiDi (bidi.py). Screenshots are kept
beside Chromium's as tests/web/firefox-*.png in the build directory.
Skipped (77) when Firefox is not installed.

    python3 test_page_firefox.py ICHTRIAGE MAKE_TEST_MODEL"""
import bidi
import test_page
import webtest as wt


class FirefoxPageTest(test_page.PageTest):
    browser_name = "firefox-esr"
    shot_prefix = "firefox-"
    # Not required: Firefox keeps an AudioContext suspended without a sound
    # device (a build machine has none); the test then checks that the page
    # says sound is off instead of counting a silent beep.
    sound_plays = False

    def find_browser(self):
        return bidi.find_firefox()

    def new_browser(self, insecure=False):
        return bidi.Browser(insecure=insecure)


if __name__ == "__main__":
    raise SystemExit(wt.main())

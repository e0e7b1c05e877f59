/* Unit tests of triage/config: defaults, the INI file, --set, errors. */
#include <criterion/criterion.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "config.h"

static void write_file(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    cr_assert_not_null(f);
    fputs(text, f);
    fclose(f);
}

Test(config, shipped_file_parses_and_matches_defaults)
{
    struct triage_config file, dflt;
    char err[256];
    cr_assert_eq(triage_config_load(&file, TEST_SOURCE_ROOT "/etc/ichtriage.conf", err, sizeof err),
                 0, "%s", err);
    cr_assert_eq(triage_config_load(&dflt, "/dev/null", err, sizeof err), 0, "%s", err);
    /* Every key documented in etc/ichtriage.conf has the built-in default. */
    for (int k = 0; k < CFG_NKEYS; k++)
        cr_expect_str_eq(triage_config_str(&file, k), triage_config_str(&dflt, k), "%s",
                         triage_config_name(k));
    triage_config_free(&file);
    triage_config_free(&dflt);
}

Test(config, shipped_file_documents_every_key)
{
    FILE *f = fopen(TEST_SOURCE_ROOT "/etc/ichtriage.conf", "r");
    cr_assert_not_null(f);
    static char text[65536];
    size_t n = fread(text, 1, sizeof text - 1, f);
    text[n] = 0;
    fclose(f);
    for (int k = 0; k < CFG_NKEYS; k++) {
        const char *key = strchr(triage_config_name(k), '.') + 1;
        char line[128];
        snprintf(line, sizeof line, "\n%s =", key);
        cr_expect(strstr(text, line) != NULL, "%s is not in etc/ichtriage.conf",
                  triage_config_name(k));
    }
}

Test(config, set_overrides_file)
{
    char path[] = "/tmp/ichtriage-conf-XXXXXX";
    int fd = mkstemp(path);
    cr_assert(fd >= 0);
    close(fd);
    write_file(path, "[dicom]\nport = 104\naetitle = NODE1\n");
    char *argv[] = {"serve", "-c", path, "--set", "dicom.port=2000", "extra", NULL};
    int argc = 6;
    struct triage_config c;
    char err[256];
    cr_assert_eq(triage_config_from_args(&c, &argc, argv, err, sizeof err), 0, "%s", err);
    cr_assert_eq(argc, 2);
    cr_assert_str_eq(argv[1], "extra");
    cr_assert_str_eq(triage_config_str(&c, CFG_DICOM_PORT), "2000");
    cr_assert_str_eq(triage_config_str(&c, CFG_DICOM_AETITLE), "NODE1");
    cr_assert_str_eq(triage_config_str(&c, CFG_STORE_DIR), "./var");
    triage_config_free(&c);
    unlink(path);
}

Test(config, unknown_key_names_it)
{
    char path[] = "/tmp/ichtriage-conf-XXXXXX";
    int fd = mkstemp(path);
    cr_assert(fd >= 0);
    close(fd);
    write_file(path, "[dicom]\nprot = 104\n");
    struct triage_config c;
    char err[256];
    cr_assert_eq(triage_config_load(&c, path, err, sizeof err), -1);
    cr_assert(strstr(err, "prot") != NULL, "%s", err);
    unlink(path);
}

Test(config, bad_set_and_missing_file)
{
    struct triage_config c;
    char err[256];
    cr_assert_eq(triage_config_load(&c, "/nonexistent/x.conf", err, sizeof err), -1);
    cr_assert(strstr(err, "/nonexistent/x.conf") != NULL, "%s", err);
    cr_assert_eq(triage_config_load(&c, "/dev/null", err, sizeof err), 0);
    cr_assert_eq(triage_config_set(&c, "dicom.port", err, sizeof err), -1);
    cr_assert_eq(triage_config_set(&c, "nosuch.key=1", err, sizeof err), -1);
    cr_assert(strstr(err, "nosuch.key") != NULL, "%s", err);
    triage_config_free(&c);
}

Test(config, integer_range_checked)
{
    struct triage_config c;
    char err[256];
    int64_t v;
    cr_assert_eq(triage_config_load(&c, "/dev/null", err, sizeof err), 0);
    cr_assert_eq(triage_config_int(&c, CFG_DICOM_PORT, 1, 65535, &v, err, sizeof err), 0);
    cr_assert_eq(v, 11112);
    triage_config_set(&c, "dicom.port=70000", err, sizeof err);
    cr_assert_eq(triage_config_int(&c, CFG_DICOM_PORT, 1, 65535, &v, err, sizeof err), -1);
    cr_assert(strstr(err, "dicom.port") != NULL, "%s", err);
    triage_config_set(&c, "dicom.port=12x", err, sizeof err);
    cr_assert_eq(triage_config_int(&c, CFG_DICOM_PORT, 1, 65535, &v, err, sizeof err), -1);
    triage_config_free(&c);
}

Test(config, reload_reads_the_file_again_and_keeps_set)
{
    char path[] = "/tmp/ichtriage-conf-XXXXXX";
    int fd = mkstemp(path);
    cr_assert(fd >= 0);
    close(fd);
    write_file(path, "[dicom]\nport = 104\nallowed_peers = CT1\n");
    char *argv[] = {"serve", "-c", path, "--set", "dicom.port=2000", NULL};
    int argc = 5;
    struct triage_config c, fresh;
    char err[256];
    cr_assert_eq(triage_config_from_args(&c, &argc, argv, err, sizeof err), 0, "%s", err);
    write_file(path, "[dicom]\nport = 105\nallowed_peers = CT2\n");
    cr_assert_eq(triage_config_reload(&c, &fresh, err, sizeof err), 0, "%s", err);
    cr_assert_str_eq(triage_config_str(&fresh, CFG_DICOM_PORT), "2000");
    cr_assert_str_eq(triage_config_str(&fresh, CFG_DICOM_ALLOWED_PEERS), "CT2");
    triage_config_free(&fresh);
    write_file(path, "[dicom]\nprot = 1\n");
    cr_assert_eq(triage_config_reload(&c, &fresh, err, sizeof err), -1);
    cr_assert(strstr(err, "prot") != NULL, "%s", err);
    triage_config_free(&c);
    unlink(path);
}

/* Loads text as a config file; returns load()'s result, err filled. */
static int load_text(struct triage_config *c, const char *text, char *err, size_t errlen)
{
    char path[] = "/tmp/ichtriage-conf-XXXXXX";
    int fd = mkstemp(path);
    cr_assert(fd >= 0);
    close(fd);
    write_file(path, text);
    int rc = triage_config_load(c, path, err, errlen);
    unlink(path);
    return rc;
}

Test(config, wrapped_or_repeated_value_is_an_error_not_its_last_part)
{
    struct triage_config c;
    char err[512];
    /* inih would take the indented line as a new value of destinations. */
    cr_assert_eq(load_text(&c,
                           "[pacs]\ndestinations = PACS1@10.0.0.1:104,\n"
                           "    PACS2@10.0.0.2:104\n",
                           err, sizeof err),
                 -1);
    /* inih reads "PACS2@10.0.0.2:104" as a key (':' also separates). */
    cr_assert(strstr(err, "unknown key [pacs] PACS2") != NULL, "%s", err);
    cr_assert_eq(
        load_text(&c, "[triage]\nhead_patterns = HEAD,BRAIN,\n  CRAN,CEREB\n", err, sizeof err),
        -1);
    cr_assert(strstr(err, "line 3") != NULL, "%s", err);
    cr_assert_eq(load_text(&c, "[triage]\nmin_slices = 5\nmin_slices = 20\n", err, sizeof err), -1);
    cr_assert(strstr(err, "min_slices is given twice") != NULL, "%s", err);
}

Test(config, long_line_is_kept_whole)
{
    /* Twelve destinations: about 300 bytes, past inih's 200-byte line. */
    char text[2048] = "[pacs]\ndestinations = ", list[1024] = "";
    for (int i = 1; i <= 12; i++)
        snprintf(list + strlen(list), sizeof list - strlen(list), "%sPACS%02d@10.0.0.%d:104",
                 i > 1 ? ", " : "", i, i);
    strcat(text, list);
    strcat(text, "\n[triage]\nmin_slices = 7\n");
    cr_assert_gt(strlen(list), 250);
    struct triage_config c;
    char err[512];
    cr_assert_eq(load_text(&c, text, err, sizeof err), 0, "%s", err);
    cr_assert_str_eq(triage_config_str(&c, CFG_PACS_DESTINATIONS), list);
    cr_assert_str_eq(triage_config_str(&c, CFG_TRIAGE_MIN_SLICES), "7");
    triage_config_free(&c);
}

Test(config, check_finds_what_a_start_would_refuse)
{
    struct triage_config c;
    char err[512];
    cr_assert_eq(triage_config_load(&c, "/dev/null", err, sizeof err), 0);
    cr_assert_eq(triage_config_check(&c, err, sizeof err), 0, "%s", err);
    const char *bad[][2] = {
        {"triage.quiet_seconds=abc", "triage.quiet_seconds"},
        {"store.retention_days=-5", "store.retention_days"},
        {"triage.pixel_decoder=bogus", "child,inline"},
        {"nn.device=quantum", "auto,cpu,cuda"},
        {"pacs.send=some", "pacs.send"},
        {"log.level=loud", "log.level"},
        {"train.auto_promote=maybe", "train.auto_promote"},
        {"dicom.aetitle=SEVENTEEN_LETTERS", "dicom.aetitle"},
        {"dicom.aetitle= NODE", "spaces at either end"},
        {"dicom.aetitle=A\\B", "dicom.aetitle"},
        {"pacs.calling_aetitle=SEVENTEEN_LETTERS", "pacs.calling_aetitle"},
        {"dicom.tls_key=/nonexistent.key", "/nonexistent.key"},
        {"http.users=/nonexistent/users", "http.users"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        struct triage_config b;
        cr_assert_eq(triage_config_load(&b, "/dev/null", err, sizeof err), 0);
        cr_assert_eq(triage_config_set(&b, bad[i][0], err, sizeof err), 0, "%s", err);
        cr_expect_eq(triage_config_check(&b, err, sizeof err), -1, "%s accepted", bad[i][0]);
        cr_expect(strstr(err, bad[i][1]) != NULL, "%s: %s", bad[i][0], err);
        triage_config_free(&b);
    }
    int64_t v;
    cr_assert_eq(triage_config_set(&c, "dicom.max_associations=1001", err, sizeof err), 0);
    cr_assert_eq(triage_config_get(&c, CFG_DICOM_MAX_ASSOCIATIONS, &v, err, sizeof err), -1);
    cr_assert(strstr(err, "from 1 to 1000") != NULL, "%s", err);
    triage_config_free(&c);
}

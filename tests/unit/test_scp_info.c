/* Unit tests of scp/'s C helpers: UID checks (everything in a spool path
 * passes them), SOP class tables, and refusing what is not DICOM. */
#include <criterion/criterion.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "scp_info.h"

Test(scp_info, uid_validity)
{
    cr_assert(scp_uid_valid("1.2.840.10008.5.1.4.1.1.2"));
    cr_assert(scp_uid_valid("2.25.123456789"));
    cr_assert_not(scp_uid_valid(""));
    cr_assert_not(scp_uid_valid(NULL));
    cr_assert_not(scp_uid_valid("../../etc"));
    cr_assert_not(scp_uid_valid(".1.2"));
    cr_assert_not(scp_uid_valid("1.2."));
    cr_assert_not(scp_uid_valid("1..2"));
    cr_assert_not(scp_uid_valid("1.2/3"));
    cr_assert_not(scp_uid_valid("1.2.3 "));
    char longuid[80];
    memset(longuid, '1', 65);
    longuid[65] = 0;
    cr_assert_not(scp_uid_valid(longuid));
    longuid[64] = 0;
    cr_assert(scp_uid_valid(longuid));
}

Test(scp_info, sop_classes)
{
    cr_assert(scp_sop_class_is_ct("1.2.840.10008.5.1.4.1.1.2"));
    cr_assert(scp_sop_class_is_ct("1.2.840.10008.5.1.4.1.1.2.1"));
    cr_assert_not(scp_sop_class_is_ct("1.2.840.10008.5.1.4.1.1.4"));
    cr_assert(scp_sop_class_storable("1.2.840.10008.5.1.4.1.1.4"));  /* MR */
    cr_assert(scp_sop_class_storable("1.2.840.10008.5.1.4.1.1.7"));  /* SC */
    cr_assert_not(scp_sop_class_storable("1.2.840.10008.1.1"));      /* Verification */
}

Test(scp_info, garbage_is_refused_with_a_message)
{
    char path[] = "/tmp/ichtriage-garbage-XXXXXX";
    int fd = mkstemp(path);
    cr_assert(fd >= 0);
    const char junk[] = "this is not a DICOM file at all, just text\n";
    cr_assert_eq(write(fd, junk, sizeof junk), (ssize_t)sizeof junk);
    close(fd);
    struct scp_info info;
    char err[256] = "";
    int rc = scp_info_read(path, &info, err, sizeof err);
    /* dcmtk may read text as a (meaningless) dataset; either way no UIDs come out. */
    if (rc == 0)
        cr_assert_not(scp_uid_valid(info.sop_uid));
    else
        cr_assert(strlen(err) > 0);
    cr_assert_eq(scp_info_read("/nonexistent/file.dcm", &info, err, sizeof err), -1);
    cr_assert(strstr(err, "cannot") != NULL, "%s", err);
    unlink(path);
}

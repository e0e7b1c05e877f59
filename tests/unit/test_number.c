/* Unit tests of util/number: a number from text is the whole text, in range,
 * or it is refused (where atoi and atof read "abc" as 0 and "3x" as 3). */
#include <criterion/criterion.h>
#include <limits.h>
#include <stdint.h>

#include "number.h"

Test(number, integers_whole_and_in_range)
{
    long v = 42;
    cr_assert_eq(util_number_long("17", 0, 100, &v), 0);
    cr_assert_eq(v, 17);
    cr_assert_eq(util_number_long("-3", -5, 5, &v), 0);
    cr_assert_eq(v, -3);
    cr_assert_eq(util_number_long("0", 0, 0, &v), 0);
    cr_assert_eq(v, 0);
    const char *bad[] = {
        "", "abc", "3x", "1.5", "1e3", "0x10", "101", "-1", "99999999999999999999"};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        v = 42;
        cr_assert_eq(util_number_long(bad[i], 0, 100, &v), -1, "\"%s\" was taken", bad[i]);
        cr_assert_eq(v, 42, "\"%s\": out changed on a refusal", bad[i]);
    }
    cr_assert_eq(util_number_long("-9223372036854775808", LONG_MIN, LONG_MAX, &v), 0);
    cr_assert_eq(v, LONG_MIN);
}

Test(number, seeds_have_no_sign)
{
    uint64_t v = 7;
    cr_assert_eq(util_number_u64("18446744073709551615", &v), 0);
    cr_assert_eq(v, UINT64_MAX);
    cr_assert_eq(util_number_u64("0", &v), 0);
    cr_assert_eq(v, 0);
    /* strtoull reads "-1" as 2^64 - 1 */
    const char *bad[] = {"-1", " -1", "+1", "", "x", "1x", "18446744073709551616"};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        v = 7;
        cr_assert_eq(util_number_u64(bad[i], &v), -1, "\"%s\" was taken", bad[i]);
        cr_assert_eq(v, 7);
    }
}

Test(number, floats_finite_and_whole)
{
    double v = 0.5;
    cr_assert_eq(util_number_double("1e-3", &v), 0);
    cr_assert_float_eq(v, 1e-3, 1e-15);
    cr_assert_eq(util_number_double("-0.25", &v), 0);
    cr_assert_float_eq(v, -0.25, 0);
    const char *bad[] = {"", "abc", "1e-3x", "0.5 ", "nan", "inf", "-inf", "1e400"};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        v = 0.5;
        cr_assert_eq(util_number_double(bad[i], &v), -1, "\"%s\" was taken", bad[i]);
        cr_assert_eq(v, 0.5);
    }
}

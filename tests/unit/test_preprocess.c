/* tests/unit/test_preprocess.c: triage/preprocess.c's regions and the head
 * crop (docs/model-format.md, "crop=head"): the crop takes the right pixels,
 * what lies past the image is air, the head box ignores stray pixels in the
 * air, and the square is centred, kept inside the image and never a blow-up
 * of more than 2x. */
#include <criterion/criterion.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "preprocess.h"

/* A rows x cols slice of air with an ellipse of brain (40 HU) centred at
 * (cx, cy) with semi-axes ax, ay. */
static float *head_slice(int rows, int cols, double cx, double cy, double ax, double ay)
{
    float *hu = malloc(sizeof(float) * (size_t)rows * cols);
    cr_assert_not_null(hu);
    for (int y = 0; y < rows; y++)
        for (int x = 0; x < cols; x++) {
            double dx = (x + 0.5 - cx) / ax, dy = (y + 0.5 - cy) / ay;
            hu[(size_t)y * cols + x] = dx * dx + dy * dy <= 1 ? 40.0f : -1000.0f;
        }
    return hu;
}

static struct triage_region head_of(const float *hu, int rows, int cols)
{
    int *count = malloc(sizeof(int) * (size_t)(rows + cols));
    struct triage_head_box b;
    triage_head_box_init(&b);
    triage_head_box_add(&b, hu, rows, cols, count);
    struct triage_region r;
    triage_head_region(&b, rows, cols, &r);
    free(count);
    return r;
}

Test(region, takes_the_pixels_it_names)
{
    enum { N = 64 };
    float hu[N * N];
    for (int i = 0; i < N * N; i++)
        hu[i] = (float)(i % 251) - 100; /* within the 40/400 window below */
    struct triage_windows w = {1, {40}, {400}};
    float out[32 * 32], scratch[32 * 32];
    struct triage_region r = {10, 20, 32, 32}; /* 1:1, so no averaging */
    cr_assert_eq(triage_preprocess_slice(hu, N, N, &r, &w, 32, 32, out, scratch), 0);
    for (int y = 0; y < 32; y++)
        for (int x = 0; x < 32; x++) {
            float want = (hu[(y + 20) * N + x + 10] - (40 - 200)) / 400;
            cr_assert_float_eq(out[y * 32 + x], want, 1e-6, "at %d,%d", x, y);
        }
}

Test(region, whole_slice_is_the_same_as_no_region)
{
    enum { R = 48, C = 40 };
    float hu[R * C];
    for (int i = 0; i < R * C; i++)
        hu[i] = (float)((i * 37) % 300) - 120;
    struct triage_windows w;
    triage_windows_default(&w);
    float a[3 * 16 * 16], b[3 * 16 * 16], scratch[3 * R * 16];
    struct triage_region whole = {0, 0, C, R};
    cr_assert_eq(triage_preprocess_slice(hu, R, C, NULL, &w, 16, 16, a, scratch), 0);
    cr_assert_eq(triage_preprocess_slice(hu, R, C, &whole, &w, 16, 16, b, scratch), 0);
    cr_assert_arr_eq(a, b, sizeof a);
}

Test(region, past_the_image_is_air)
{
    enum { N = 16 };
    float hu[N * N];
    for (int i = 0; i < N * N; i++)
        hu[i] = 40;
    /* A window where air (-1024 HU) is not 0, so that padding shows. */
    struct triage_windows w = {2, {-1000, 40}, {200, 80}};
    float out[2 * N * N], scratch[2 * N * N];
    struct triage_region r = {-8, 4, N, N}; /* 8 columns left of the image, 4 rows below */
    cr_assert_eq(triage_preprocess_slice(hu, N, N, &r, &w, N, N, out, scratch), 0);
    float air0 = (-1024.0f - (-1100.0f)) / 200.0f; /* 0.38 */
    for (int y = 0; y < N; y++)
        for (int x = 0; x < N; x++) {
            bool inside = x >= 8 && y < N - 4;
            cr_assert_float_eq(out[y * N + x], inside ? 1.0f : air0, 1e-6, "ch0 %d,%d", x, y);
            cr_assert_float_eq(out[N * N + y * N + x], inside ? 0.5f : 0.0f, 1e-6, "ch1 %d,%d", x,
                               y);
        }
}

Test(region, refuses_nonsense)
{
    float hu[16] = {0}, out[48], scratch[48];
    struct triage_windows w;
    triage_windows_default(&w);
    struct triage_region empty = {0, 0, 0, 4}, far = {1000000, 0, 4, 4};
    cr_assert_eq(triage_preprocess_slice(hu, 4, 4, &empty, &w, 4, 4, out, scratch), -1);
    cr_assert_eq(triage_preprocess_slice(hu, 4, 4, &far, &w, 4, 4, out, scratch), -1);
}

Test(head, square_around_the_head_ignoring_stray_pixels)
{
    enum { N = 256 };
    float *hu = head_slice(N, N, 110, 140, 50, 70); /* x 60-160, y 70-210 */
    /* Bright single pixels in the air (a lead, noise) are not the head. */
    hu[5 * N + 5] = hu[250 * N + 3] = hu[7 * N + 250] = 1000;
    struct triage_region r = head_of(hu, N, N);
    /* Height 140, plus 1/16: 148; centred on the box. */
    cr_assert(r.w == r.h && r.w >= 146 && r.w <= 150, "side %d", r.w);
    cr_assert(fabs(r.x + r.w / 2.0 - 110) <= 2 && fabs(r.y + r.h / 2.0 - 140) <= 2,
              "region %d,%d %dx%d", r.x, r.y, r.w, r.h);
    free(hu);
}

Test(head, no_head_or_a_big_one_keeps_the_whole_slice)
{
    enum { N = 128 };
    float *air = head_slice(N, N, 0, 0, 1e-3, 1e-3);
    struct triage_region r = head_of(air, N, N);
    cr_assert(r.x == 0 && r.y == 0 && r.w == N && r.h == N);
    float *big = head_slice(N, N, 64, 64, 60, 62); /* 124 + 1/16 > 128 */
    r = head_of(big, N, N);
    cr_assert(r.x == 0 && r.y == 0 && r.w == N && r.h == N);
    free(air);
    free(big);
}

Test(head, small_head_is_not_blown_up_more_than_twice)
{
    enum { N = 200 };
    float *hu = head_slice(N, N, 100, 100, 10, 12);
    struct triage_region r = head_of(hu, N, N);
    cr_assert_eq(r.w, 100);
    cr_assert_eq(r.h, 100);
    cr_assert(r.x == 50 && r.y == 50, "%d,%d", r.x, r.y);
    free(hu);
}

Test(head, square_stays_inside_the_image_when_it_fits)
{
    enum { N = 256 };
    float *hu = head_slice(N, N, 62, 128, 60, 70); /* touches the left edge */
    struct triage_region r = head_of(hu, N, N);
    cr_assert(r.w < N);
    cr_assert_eq(r.x, 0);
    cr_assert(r.x + r.w <= N && r.y >= 0 && r.y + r.h <= N);
    free(hu);
}

Test(head, box_is_the_union_over_slices)
{
    enum { N = 256 };
    float *a = head_slice(N, N, 80, 128, 30, 40), *b = head_slice(N, N, 170, 128, 30, 40);
    int *count = malloc(sizeof(int) * 2 * N);
    struct triage_head_box box;
    triage_head_box_init(&box);
    triage_head_box_add(&box, a, N, N, count);
    triage_head_box_add(&box, b, N, N, count);
    cr_assert(box.x0 >= 50 && box.x0 <= 52 && box.x1 >= 198 && box.x1 <= 200, "x %d-%d", box.x0,
              box.x1);
    cr_assert(box.y0 >= 88 && box.y0 <= 90 && box.y1 >= 166 && box.y1 <= 168, "y %d-%d", box.y0,
              box.y1);
    free(a);
    free(b);
    free(count);
}

Test(crop, parsed_from_the_preprocessing_metadata)
{
    bool crop = true;
    char err[128];
    cr_assert_eq(triage_crop_parse(NULL, &crop, err, sizeof err), 0);
    cr_assert(!crop);
    cr_assert_eq(triage_crop_parse(TRIAGE_PREPROCESSING, &crop, err, sizeof err), 0);
    cr_assert(!crop);
    cr_assert_eq(triage_crop_parse(TRIAGE_PREPROCESSING_CROP, &crop, err, sizeof err), 0);
    cr_assert(crop);
    cr_assert_eq(triage_crop_parse("window=clamp01;crop=none;note", &crop, err, sizeof err), 0);
    cr_assert(!crop);
    cr_assert_eq(triage_crop_parse("crop=brain;resize=area", &crop, err, sizeof err), -1);
    cr_assert(strstr(err, "crop=brain"), "%s", err);
    cr_assert_eq(triage_crop_parse("crop=headx", &crop, err, sizeof err), -1);
}

/* Slice i of a series holds the value 10 i in each of its c x hw floats,
 * plus the channel number, so that both the slice and the channel show. */
static void series_of_constants(float *x, int n, int c, int hw)
{
    for (int i = 0; i < n; i++)
        for (int ch = 0; ch < c; ch++)
            for (int q = 0; q < hw; q++)
                x[((size_t)i * c + ch) * hw + q] = 10.0f * i + ch;
}

Test(context, neighbours_in_order_and_the_end_slice_beyond_the_ends)
{
    enum { N = 5, C = 3, HW = 4, K = 2, S = 2 * K + 1 };
    float x[N * C * HW], out[N * S * C * HW];
    series_of_constants(x, N, C, HW);
    triage_context_stack(x, N, (size_t)C * HW, K, 0, N, out);
    for (int i = 0; i < N; i++)
        for (int s = 0; s < S; s++) {
            int j = i + s - K;
            j = j < 0 ? 0 : j >= N ? N - 1 : j;
            for (int ch = 0; ch < C; ch++)
                for (int q = 0; q < HW; q++)
                    cr_assert_eq(out[(((size_t)i * S + s) * C + ch) * HW + q], 10.0f * j + ch,
                                 "slice %d, neighbour %d, channel %d", i, s - K, ch);
        }
    /* the centre block is the slice itself */
    for (int i = 0; i < N; i++)
        cr_assert_eq(memcmp(out + ((size_t)i * S + K) * C * HW, x + (size_t)i * C * HW,
                            sizeof(float) * C * HW),
                     0);
    /* a chunk from the middle is the same as those slices of the whole */
    float part[2 * S * C * HW];
    triage_context_stack(x, N, (size_t)C * HW, K, 2, 2, part);
    cr_assert_eq(memcmp(part, out + (size_t)2 * S * C * HW, sizeof part), 0);
    /* context 0 is the slices themselves; a one-slice series repeats it */
    triage_context_stack(x, N, (size_t)C * HW, 0, 0, N, out);
    cr_assert_eq(memcmp(out, x, sizeof x), 0);
    triage_context_stack(x, 1, (size_t)C * HW, 1, 0, 1, out);
    for (int s = 0; s < 3; s++)
        cr_assert_eq(memcmp(out + (size_t)s * C * HW, x, sizeof(float) * C * HW), 0);
}

Test(context, parsed_from_the_metadata)
{
    int k = -1;
    char err[128];
    cr_assert_eq(triage_context_parse(NULL, &k, err, sizeof err), 0);
    cr_assert_eq(k, 0);
    cr_assert_eq(triage_context_parse("1", &k, err, sizeof err), 0);
    cr_assert_eq(k, 1);
    cr_assert_eq(triage_context_parse("4", &k, err, sizeof err), 0);
    cr_assert_eq(k, 4);
    const char *bad[] = {"", "-1", "5", "1x", "one"};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        cr_assert_eq(triage_context_parse(bad[i], &k, err, sizeof err), -1, "'%s'", bad[i]);
        cr_assert(strstr(err, "context"), "%s", err);
    }
}

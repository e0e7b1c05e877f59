/* tests/nn/test_safetensors.c: the reader refuses malformed, truncated and
 * mismatched files with a message that names the problem. */
#include "nn_test.h"

#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static char path[64];

static void setup(void)
{
    strcpy(path, "/tmp/nn_test_st_XXXXXX");
    int fd = mkstemp(path);
    cr_assert(fd >= 0);
    close(fd);
}

static void teardown(void)
{
    unlink(path);
}

TestSuite(safetensors, .init = setup, .fini = teardown);

/* Writes an 8-byte length (hlen) then the header text, then extra data bytes. */
static void write_raw(unsigned long long hlen, const char *header, size_t data)
{
    FILE *f = fopen(path, "wb");
    cr_assert(f);
    for (int i = 0; i < 8; i++)
        fputc((int)((hlen >> (8 * i)) & 0xff), f);
    fputs(header, f);
    for (size_t i = 0; i < data; i++)
        fputc(0, f);
    fclose(f);
}

static void expect_refused(const char *needle)
{
    char err[256] = "";
    nn_st_file *f = nn_st_open(path, err, sizeof(err));
    cr_expect_null(f, "accepted a bad file (expected: %s)", needle);
    nn_st_close(f);
    cr_expect(strstr(err, needle) != NULL, "message '%s' does not say '%s'", err, needle);
}

Test(safetensors, well_formed_file_reads)
{
    const char *h = "{\"__metadata__\":{\"arch\":\"small\"},"
                    "\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}";
    write_raw(strlen(h), h, 8);
    char err[256] = "";
    nn_st_file *f = nn_st_open(path, err, sizeof(err));
    cr_assert(f, "%s", err);
    cr_expect_str_eq(nn_st_meta(f, "arch"), "small");
    cr_expect_eq(nn_st_count(f), 1);
    float a[2] = {1, 1};
    cr_expect_eq(nn_st_read_f32(f, "a", a, 2, err, sizeof(err)), 0);
    cr_expect(a[0] == 0.0f && a[1] == 0.0f);
    cr_expect_eq(nn_st_read_f32(f, "a", a, 3, err, sizeof(err)), -1);
    cr_expect(strstr(err, "expected 3") != NULL, "%s", err);
    nn_st_close(f);
    nn_st_close(NULL);
}

Test(safetensors, too_short)
{
    FILE *f = fopen(path, "wb");
    fputs("abc", f);
    fclose(f);
    expect_refused("too short");
}

Test(safetensors, header_length_past_the_end)
{
    write_raw(1000, "{}", 0);
    expect_refused("header length");
}

Test(safetensors, header_not_json)
{
    write_raw(5, "{\"a\":", 0);
    expect_refused("not a JSON object");
}

Test(safetensors, truncated_data)
{
    const char *h = "{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]}}";
    write_raw(strlen(h), h, 10);
    expect_refused("truncated");
}

Test(safetensors, shape_and_offsets_disagree)
{
    const char *h = "{\"a\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,16]}}";
    write_raw(strlen(h), h, 16);
    expect_refused("tensor a: shape needs 12 bytes");
}

Test(safetensors, unknown_dtype_and_bad_fields)
{
    const char *h = "{\"a\":{\"dtype\":\"Q4\",\"shape\":[1],\"data_offsets\":[0,1]}}";
    write_raw(strlen(h), h, 4);
    expect_refused("unsupported dtype Q4");
    h = "{\"a\":{\"dtype\":\"F32\",\"shape\":[-1],\"data_offsets\":[0,4]}}";
    write_raw(strlen(h), h, 4);
    expect_refused("bad shape");
    h = "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,0]}}";
    write_raw(strlen(h), h, 4);
    expect_refused("bad data_offsets");
    h = "{\"__metadata__\":{\"k\":3}}";
    write_raw(strlen(h), h, 0);
    expect_refused("metadata k is not a string");
}

Test(safetensors, duplicate_names)
{
    const char *h = "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
                    "\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}";
    write_raw(strlen(h), h, 4);
    expect_refused("appears twice");
}

/* The tensors must cover the data exactly, as the format says: a byte of
 * two tensors, or of none, is refused; the order of the header does not
 * matter, nor do empty tensors. */
Test(safetensors, data_covered_exactly)
{
    const char *h = "{\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,12]},"
                    "\"e\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[8,8]},"
                    "\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}";
    write_raw(strlen(h), h, 12);
    char err[256] = "";
    nn_st_file *f = nn_st_open(path, err, sizeof(err));
    cr_expect(f, "%s", err);
    nn_st_close(f);
    /* each header with its data bytes, and why it is refused */
    static const struct {
        const char *h;
        size_t data;
        const char *why;
    } bad[] = {
        /* as the reviewer made it: two tensors reading the same bytes */
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
         "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}",
         8, "tensors a and b overlap"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
         "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}",
         12, "tensors a and b overlap"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
         "\"e\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[4,4]}}",
         8, "tensors a and e overlap"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
         "\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,12]}}",
         12, "data bytes 4 to 8 belong to no tensor (before b)"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", 8,
         "data bytes 0 to 4 belong to no tensor"},
        {"{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 9,
         "data bytes 4 to 9 belong to no tensor (after the last)"},
        {"{\"__metadata__\":{\"k\":\"v\"}}", 4, "data bytes 0 to 4 belong to no tensor"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        write_raw(strlen(bad[i].h), bad[i].h, bad[i].data);
        expect_refused(bad[i].why);
    }
}

/* A header of n empty tensors t0, t1, ... */
static void write_many(int n)
{
    const char *entry = "\"t%d\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[0,0]}";
    size_t cap = (size_t)n * 80 + 16, len = 0;
    char *h = malloc(cap);
    cr_assert(h);
    h[len++] = '{';
    for (int i = 0; i < n; i++) {
        if (i) h[len++] = ',';
        len += (size_t)snprintf(h + len, cap - len, entry, i);
    }
    snprintf(h + len, cap - len, "}");
    write_raw(strlen(h), h, 0);
    free(h);
}

/* The duplicate-name check compares every pair: the number of tensors is
 * capped, so a hostile header of a million entries is refused, not spent
 * hours on. */
Test(safetensors, tensor_count_is_capped)
{
    write_many(NN_ST_MAX_TENSORS);
    char err[256] = "";
    nn_st_file *f = nn_st_open(path, err, sizeof(err));
    cr_assert(f, "%s", err);
    cr_expect_eq(nn_st_count(f), NN_ST_MAX_TENSORS);
    nn_st_close(f);
    write_many(NN_ST_MAX_TENSORS + 1);
    char want[64];
    snprintf(want, sizeof want, "more than %d tensors", NN_ST_MAX_TENSORS);
    expect_refused(want);
}

/* Model-level: a real model file, cut short or altered, is refused by name. */
static void copy_ref_model(size_t cut)
{
    char src[512];
    snprintf(src, sizeof(src), "%s/tiny_lrcn.safetensors", NN_REF_DIR);
    FILE *in = fopen(src, "rb"), *out = fopen(path, "wb");
    cr_assert(in && out);
    fseek(in, 0, SEEK_END);
    long n = ftell(in);
    fseek(in, 0, SEEK_SET);
    for (long i = 0; i < n - (long)cut; i++)
        fputc(fgetc(in), out);
    fclose(in);
    fclose(out);
}

Test(safetensors, model_truncated_is_refused)
{
    copy_ref_model(100);
    char err[256] = "";
    cr_expect_null(nn_model_load(path, err, sizeof(err)));
    cr_expect(strstr(err, "truncated") != NULL, "%s", err);
}

Test(safetensors, model_mismatch_names_the_tensor)
{
    char err[256] = "";
    nn_config c;
    nn_config_default(&c);
    c.arch = "b4,M,b6,M,c8,G|";
    c.in_h = c.in_w = 16;
    c.lstm_hidden = 5;
    c.dense = 7; /* the reference file has 6 */
    nn_model *m = nn_model_create(&c, err, sizeof(err));
    cr_assert(m, "%s", err);
    cr_assert_eq(nn_model_save(m, path, err, sizeof(err)), 0, "%s", err);
    nn_model_free(m);
    /* same file, metadata says dense=6: every dense tensor has the wrong shape */
    nn_st_file *f = nn_st_open(path, err, sizeof(err));
    cr_assert(f);
    int n = nn_st_count(f);
    nn_st_entry *e = calloc(n, sizeof(*e));
    for (int i = 0; i < n; i++) {
        const nn_st_tensor *t = nn_st_at(f, i);
        e[i].name = t->name, e[i].dtype = t->dtype, e[i].ndim = t->ndim, e[i].data = t->data;
        memcpy(e[i].shape, t->shape, sizeof(t->shape));
    }
    const char *k[] = {"arch", "input", "lstm_hidden", "dense"};
    const char *v[] = {"b4,M,b6,M,c8,G|", "3x16x16", "5", "6"};
    char other[80];
    snprintf(other, sizeof(other), "%s.b", path);
    cr_assert_eq(nn_st_write(other, e, n, k, v, 4, err, sizeof(err)), 0, "%s", err);
    nn_st_close(f);
    free(e);
    cr_expect_null(nn_model_load(other, err, sizeof(err)));
    cr_expect(strstr(err, "tensor dense.0.weight") && strstr(err, "F32[6,10]"), "%s", err);
    const char *v2[] = {"small|", "3x16x16", "5", "7"};
    f = nn_st_open(path, err, sizeof(err));
    cr_assert_eq(nn_st_write(other, NULL, 0, k, v2, 4, err, sizeof(err)), 0, "%s", err);
    nn_st_close(f);
    cr_expect_null(nn_model_load(other, err, sizeof(err)));
    cr_expect(strstr(err, "arch") != NULL, "%s", err);
    unlink(other);
}

/* A real model whose two tensors share their data is refused by the loader
 * too (the weights of one would silently be another's). */
Test(safetensors, model_with_overlapping_tensors_is_refused)
{
    copy_ref_model(0);
    FILE *in = fopen(path, "rb");
    cr_assert(in);
    fseek(in, 0, SEEK_END);
    long len = ftell(in);
    fseek(in, 0, SEEK_SET);
    char *b = malloc(len + 1);
    cr_assert(b && fread(b, 1, len, in) == (size_t)len);
    fclose(in);
    b[len] = 0;
    /* dense.0.bias moved onto the first bytes of the data, in a header of
     * the same length ("[0,24]" padded with spaces) */
    char *at = strstr(b + 8, "\"dense.0.bias\"");
    cr_assert(at);
    at = strstr(at, "\"data_offsets\":[");
    cr_assert(at);
    at += strlen("\"data_offsets\":[");
    size_t w = strcspn(at, "]");
    char repl[32];
    int rl = snprintf(repl, sizeof repl, "0,%d", 6 * 4);
    cr_assert((size_t)rl <= w);
    memset(at, ' ', w);
    memcpy(at, repl, (size_t)rl);
    FILE *out = fopen(path, "wb");
    cr_assert(out && fwrite(b, 1, len, out) == (size_t)len);
    fclose(out);
    free(b);
    char err[256] = "";
    cr_expect_null(nn_model_load(path, err, sizeof(err)));
    cr_expect(strstr(err, "overlap") && strstr(err, "dense.0.bias"), "%s", err);
}

/* Damaged copies of a real model file (bytes of the header and data changed,
 * the file cut anywhere): each is loaded or refused with a message, never
 * crashes. Deterministic, so a failure reproduces. */
Test(safetensors, damaged_files_never_crash)
{
    char src[512];
    snprintf(src, sizeof(src), "%s/tiny_lrcn.safetensors", NN_REF_DIR);
    FILE *in = fopen(src, "rb");
    cr_assert(in);
    fseek(in, 0, SEEK_END);
    long n = ftell(in);
    fseek(in, 0, SEEK_SET);
    unsigned char *orig = malloc(n), *bad = malloc(n);
    cr_assert(orig && bad && fread(orig, 1, n, in) == (size_t)n);
    fclose(in);
    size_t hlen = 0;
    for (int i = 7; i >= 0; i--)
        hlen = (hlen << 8) | orig[i];
    uint64_t rng = 12345;
    int refused = 0;
    for (int trial = 0; trial < 300; trial++) {
        memcpy(bad, orig, n);
        long len = n;
        int kind = trial % 3;
        if (kind == 0) { /* a few bytes of the header replaced */
            for (int k = 0; k < 3; k++) {
                size_t at = nn_rng_next(&rng) % (hlen + 8);
                bad[at] = (unsigned char)nn_rng_next(&rng);
            }
        } else if (kind == 1) { /* a header character swapped for JSON punctuation */
            static const char punct[] = "{}[]\",:0-9 ";
            size_t at = 8 + nn_rng_next(&rng) % hlen;
            bad[at] = (unsigned char)punct[nn_rng_next(&rng) % (sizeof(punct) - 1)];
        } else { /* cut short */
            len = (long)(nn_rng_next(&rng) % (unsigned long)n);
        }
        FILE *out = fopen(path, "wb");
        cr_assert(out);
        fwrite(bad, 1, len, out);
        fclose(out);
        char err[256] = "";
        nn_model *m = nn_model_load(path, err, sizeof(err));
        if (!m) {
            cr_expect(err[0] != '\0', "trial %d refused without a message", trial);
            refused++;
        }
        nn_model_free(m);
    }
    cr_expect_gt(refused, 150, "only %d of 300 damaged files refused", refused);
    free(orig);
    free(bad);
}

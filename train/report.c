/* train/report.c: the evaluation as a table on the terminal, as metrics
 * JSON and as one self-contained HTML page with inline SVG (ROC curves,
 * loss and AUC per epoch, confusion matrix, reliability diagram). */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "trainer.h"

static const char *const names[TRAIN_LABELS] = {
    "any", "epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural"};
static const char *const level_names[2] = {"slice", "study"};
static const char *const model_names[2] = {"CNN", "LRCN"};

#define NOTICE "Decision support, not a diagnosis."

/* "0.912 [0.871, 0.953]"; "n/a" for a figure a class too few makes
 * undefined (no positives: no sensitivity, no AUC; one: no AUC interval). */
static const char *with_ci(char out[40], double v, double lo, double hi)
{
    if (isnan(v))
        snprintf(out, 40, "n/a");
    else if (isnan(lo) || isnan(hi))
        snprintf(out, 40, "%.3f [n/a]", v);
    else
        snprintf(out, 40, "%.3f [%.3f, %.3f]", v, lo, hi);
    return out;
}

const char *train_num(char out[32], const char *fmt, double v)
{
    if (isnan(v))
        snprintf(out, 32, "n/a");
    else
        snprintf(out, 32, fmt, v);
    return out;
}

/* Why the paired comparison has no p-value (c->auc.p NAN), or "". */
static const char *paired_na(const struct train_eval *e)
{
    const struct train_binary *b = &e->m[TRAIN_LEVEL_STUDY][TRAIN_MODEL_LRCN][0];
    if (!isnan(e->cmp.auc.p) || isnan(e->cmp.auc.diff)) return "";
    if (b->pos < 2 || b->n - b->pos < 2) return "; fewer than 2 positive or negative studies";
    return "; the variance of the difference is 0 while the AUCs differ: one model separates "
           "the studies perfectly, the other not at all";
}

#define AUC_BOUND_NOTE                                                                             \
    "DeLong's variance of an AUC of 1 or 0 (or of scores all tied) is 0; its interval is "         \
    "Wilson's for the AUC as a proportion of min(positives, negatives)"

void train_eval_print(FILE *f, const struct train_eval *e)
{
    fprintf(f, "%s %d studies, %d series, %zu slices\n", NOTICE, e->nstudies, e->nseries,
            e->nslices);
    fprintf(f, "%-6s %-5s %-17s %6s %6s %6s %6s %6s %6s\n", "level", "model", "label", "acc",
            "sens", "spec", "prec", "auc", "thr");
    for (int lv = 0; lv < 2; lv++)
        for (int mo = 0; mo < 2; mo++) {
            for (int l = 0; l < TRAIN_LABELS; l++) {
                const struct train_binary *b = &e->m[lv][mo][l];
                double v[] = {b->accuracy,  b->sensitivity, b->specificity,
                              b->precision, b->auc,         e->thresholds[mo][l]};
                fprintf(f, "%-6s %-5s %-17s", level_names[lv], model_names[mo], names[l]);
                for (int i = 0; i < 6; i++)
                    if (isnan(v[i]))
                        fputs("    n/a", f);
                    else
                        fprintf(f, " %6.3f", v[i]);
                fputc('\n', f);
            }
            char wl[32];
            fprintf(f, "%-6s %-5s weighted log loss %s\n", level_names[lv], model_names[mo],
                    train_num(wl, "%.4f", e->weighted_logloss[lv][mo]));
        }
    const struct train_binary *a = &e->m[TRAIN_LEVEL_STUDY][TRAIN_MODEL_LRCN][0];
    fprintf(f,
            "95%% confidence intervals, study level, \"any\", %zu positive and %zu negative "
            "studies\n(DeLong for the AUC, Wilson for sensitivity and specificity):\n",
            a->pos, a->n - a->pos);
    int bound = 0;
    for (int mo = 0; mo < 2; mo++) {
        const struct train_binary *b = &e->m[TRAIN_LEVEL_STUDY][mo][0];
        char x[3][40];
        fprintf(f, "study  %-5s auc %s%s  sens %s  spec %s\n", model_names[mo],
                with_ci(x[0], b->auc, b->auc_lo, b->auc_hi), b->auc_ci_bound ? "*" : "",
                with_ci(x[1], b->sensitivity, b->sens_lo, b->sens_hi),
                with_ci(x[2], b->specificity, b->spec_lo, b->spec_hi));
        bound |= b->auc_ci_bound;
    }
    if (bound) fprintf(f, "* %s\n", AUC_BOUND_NOTE);
    const struct train_compare *c = &e->cmp;
    if (c->valid) {
        char x[8][32];
        fprintf(f, "Compared with %s on the same %d studies (study level, LRCN, \"any\"):\n",
                c->model, e->nstudies);
        fprintf(f,
                "auc %s against %s: difference %s [%s, %s], p = %s (DeLong, paired%s)\n"
                "the other model at its own threshold: sens %s  spec %s\n",
                train_num(x[0], "%.3f", c->auc.auc_a), train_num(x[1], "%.3f", c->auc.auc_b),
                train_num(x[2], "%+.3f", c->auc.diff), train_num(x[3], "%+.3f", c->auc.lo),
                train_num(x[4], "%+.3f", c->auc.hi), train_num(x[5], "%.3g", c->auc.p),
                paired_na(e), train_num(x[6], "%.3f", c->sensitivity),
                train_num(x[7], "%.3f", c->specificity));
    }
}

void train_eval_summary(const struct train_eval *e, char *out, size_t n)
{
    const struct train_binary *l = &e->m[TRAIN_LEVEL_STUDY][TRAIN_MODEL_LRCN][0];
    const struct train_binary *c = &e->m[TRAIN_LEVEL_STUDY][TRAIN_MODEL_CNN][0];
    char x[5][32], ci[64] = "n/a";
    if (!isnan(l->auc_lo) && !isnan(l->auc_hi))
        snprintf(ci, sizeof ci, "%.3f-%.3f", l->auc_lo, l->auc_hi);
    snprintf(out, n,
             "studies=%d series=%d study_auc_any=%s study_auc_any_ci95=%s sensitivity=%s "
             "specificity=%s threshold=%.4f cnn_study_auc_any=%s weighted_logloss_slice=%s",
             e->nstudies, e->nseries, train_num(x[0], "%.4f", l->auc), ci,
             train_num(x[1], "%.4f", l->sensitivity), train_num(x[2], "%.4f", l->specificity),
             e->thresholds[1][0], train_num(x[3], "%.4f", c->auc),
             train_num(x[4], "%.4f", e->weighted_logloss[TRAIN_LEVEL_SLICE][TRAIN_MODEL_LRCN]));
}

static void jnum(FILE *f, double v)
{
    if (isnan(v) || isinf(v))
        fputs("null", f);
    else
        fprintf(f, "%.6g", v);
}

/* [lo, hi], or null when the interval is undefined (or not computed) */
static void jpair(FILE *f, const char *key, double lo, double hi)
{
    fprintf(f, ", \"%s\": ", key);
    if (isnan(lo) || isnan(hi)) {
        fputs("null", f);
        return;
    }
    fputc('[', f);
    jnum(f, lo);
    fputs(", ", f);
    jnum(f, hi);
    fputc(']', f);
}

static void esc(FILE *f, const char *s)
{
    for (; s && *s; s++) {
        if (*s == '<')
            fputs("&lt;", f);
        else if (*s == '>')
            fputs("&gt;", f);
        else if (*s == '&')
            fputs("&amp;", f);
        else if (*s == '"')
            fputs("&quot;", f);
        else
            fputc(*s, f);
    }
}

static void jstr(FILE *f, const char *s)
{
    fputc('"', f);
    for (; s && *s; s++) {
        if (*s == '"' || *s == '\\')
            fputc('\\', f), fputc(*s, f);
        else if ((unsigned char)*s < 0x20)
            fprintf(f, "\\u%04x", *s);
        else
            fputc(*s, f);
    }
    fputc('"', f);
}

static int write_json(const char *path, const char *model, const struct train_eval *e,
                      const struct train_epoch *h, int nh, const struct train_reliability *rel)
{
    FILE *f = fopen(path, "w");
    if (!f) return -1;
    fprintf(f, "{\"notice\": \"%s\", \"model\": ", NOTICE);
    jstr(f, model);
    fprintf(f, ", \"studies\": %d, \"series\": %d, \"slices\": %zu, \"levels\": {", e->nstudies,
            e->nseries, e->nslices);
    for (int lv = 0; lv < 2; lv++) {
        fprintf(f, "%s\"%s\": {", lv ? ", " : "", level_names[lv]);
        for (int mo = 0; mo < 2; mo++) {
            fprintf(f, "%s\"%s\": {\"weighted_logloss\": ", mo ? ", " : "", mo ? "lrcn" : "cnn");
            jnum(f, e->weighted_logloss[lv][mo]);
            for (int l = 0; l < TRAIN_LABELS; l++) {
                const struct train_binary *b = &e->m[lv][mo][l];
                fprintf(f,
                        ", \"%s\": {\"n\": %zu, \"positives\": %zu, \"tp\": %zu, \"fp\": %zu, "
                        "\"tn\": %zu, \"fn\": %zu, \"threshold\": ",
                        names[l], b->n, b->pos, b->tp, b->fp, b->tn, b->fn);
                jnum(f, e->thresholds[mo][l]);
                const char *k[] = {"accuracy",  "sensitivity", "specificity",
                                   "precision", "auc",         "logloss"};
                double v[] = {b->accuracy,  b->sensitivity, b->specificity,
                              b->precision, b->auc,         b->logloss};
                for (int i = 0; i < 6; i++) {
                    fprintf(f, ", \"%s\": ", k[i]);
                    jnum(f, v[i]);
                }
                jpair(f, "auc_ci95", b->auc_lo, b->auc_hi);
                if (!isnan(b->auc_lo))
                    fprintf(f, ", \"auc_ci95_method\": \"%s\"",
                            b->auc_ci_bound ? "wilson_min_class" : "delong");
                jpair(f, "sensitivity_ci95", b->sens_lo, b->sens_hi);
                jpair(f, "specificity_ci95", b->spec_lo, b->spec_hi);
                fputc('}', f);
            }
            fputc('}', f);
        }
        fputc('}', f);
    }
    fputs("}, \"history\": [", f);
    for (int i = 0; i < nh; i++) {
        fprintf(f, "%s{\"stage\": %d, \"epoch\": %d, \"train_loss\": ", i ? ", " : "", h[i].stage,
                h[i].epoch);
        jnum(f, h[i].train_loss);
        fputs(", \"val_loss\": ", f);
        jnum(f, h[i].val_loss);
        fputs(", \"val_auc\": ", f);
        jnum(f, h[i].val_auc);
        fprintf(f, ", \"seconds\": %.1f}", h[i].seconds);
    }
    fputs("]", f);
    if (e->cmp.valid) {
        const struct train_compare *c = &e->cmp;
        fputs(", \"compare\": {\"model\": ", f);
        jstr(f, c->model);
        fputs(", \"level\": \"study\", \"label\": \"any\", \"auc\": ", f);
        jnum(f, c->auc.auc_a);
        fputs(", \"other_auc\": ", f);
        jnum(f, c->auc.auc_b);
        fputs(", \"difference\": ", f);
        jnum(f, c->auc.diff);
        jpair(f, "difference_ci95", c->auc.lo, c->auc.hi);
        fputs(", \"p_value\": ", f);
        jnum(f, c->auc.p);
        fputs(", \"other_sensitivity\": ", f);
        jnum(f, c->sensitivity);
        fputs(", \"other_specificity\": ", f);
        jnum(f, c->specificity);
        fputs("}", f);
    }
    if (rel && rel->valid) {
        fputs(", \"temperature\": [", f);
        for (int l = 0; l < TRAIN_LABELS; l++)
            fprintf(f, "%s%.4f", l ? ", " : "", rel->temperature[l]);
        fputs("]", f);
    }
    fputs("}\n", f);
    return fclose(f) == 0 ? 0 : -1;
}

/* ---- SVG helpers ------------------------------------------------------------------ */

#define W 320
#define H 240
#define PAD 36

static void svg_axes(FILE *f, const char *title, const char *xl, const char *yl)
{
    fprintf(f,
            "<svg xmlns='http://www.w3.org/2000/svg' width='%d' height='%d' "
            "style='background:#fff;border:1px solid #ccc;margin:4px'>",
            W, H);
    fprintf(f, "<text x='%d' y='14' font-size='12' text-anchor='middle'>", W / 2);
    esc(f, title);
    fprintf(f, "</text><line x1='%d' y1='%d' x2='%d' y2='%d' stroke='#000'/>", PAD, H - PAD, W - 8,
            H - PAD);
    fprintf(f, "<line x1='%d' y1='20' x2='%d' y2='%d' stroke='#000'/>", PAD, PAD, H - PAD);
    fprintf(f, "<text x='%d' y='%d' font-size='10' text-anchor='middle'>%s</text>", W / 2, H - 8,
            xl);
    fprintf(f,
            "<text x='10' y='%d' font-size='10' transform='rotate(-90 10 %d)' "
            "text-anchor='middle'>%s</text>",
            H / 2, H / 2, yl);
}

static double sx(double v, double lo, double hi)
{
    return PAD + (hi > lo ? (v - lo) / (hi - lo) : 0) * (W - 8 - PAD);
}
static double sy(double v, double lo, double hi)
{
    return H - PAD - (hi > lo ? (v - lo) / (hi - lo) : 0) * (H - PAD - 20);
}

static const char *const colors[4] = {"#1f77b4", "#d62728", "#2ca02c", "#ff7f0e"};

static void svg_poly(FILE *f, const float *x, const float *y, int n, double xlo, double xhi,
                     double ylo, double yhi, const char *color)
{
    fprintf(f, "<polyline fill='none' stroke='%s' stroke-width='1.5' points='", color);
    for (int i = 0; i < n; i++)
        fprintf(f, "%.1f,%.1f ", sx(x[i], xlo, xhi), sy(y[i], ylo, yhi));
    fputs("'/>", f);
}

static void svg_legend(FILE *f, int i, const char *label)
{
    fprintf(f, "<rect x='%d' y='%d' width='10' height='3' fill='%s'/>", W - 130,
            H - PAD - 60 + 12 * i, colors[i]);
    fprintf(f, "<text x='%d' y='%d' font-size='10'>%s</text>", W - 116, H - PAD - 55 + 12 * i,
            label);
}

int train_report_write(const char *html_path, const char *json_path, const char *title,
                       const char *model_path, const char *data_desc, const struct train_eval *e,
                       const struct train_epoch *h, int nh, const char *val_auc,
                       const struct train_reliability *rel, char *err, size_t errlen)
{
    if (json_path && write_json(json_path, model_path, e, h, nh, rel) != 0) {
        snprintf(err, errlen, "%s: cannot write", json_path);
        return -1;
    }
    FILE *f = fopen(html_path, "w");
    if (!f) {
        snprintf(err, errlen, "%s: cannot write", html_path);
        return -1;
    }
    fputs("<!doctype html><html><head><meta charset='utf-8'><title>", f);
    esc(f, title);
    fputs("</title><style>body{font-family:sans-serif;margin:1.5em;max-width:70em}"
          "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;"
          "padding:2px 6px;text-align:right}th{background:#eee}.n{background:#fee;"
          "border:2px solid #c00;padding:.5em;font-weight:bold}</style></head><body>",
          f);
    fprintf(f,
            "<p class='n'>%s Probabilities from this model must not be used on their own to "
            "decide care.</p><h1>",
            NOTICE);
    esc(f, title);
    fputs("</h1><p>Model: <code>", f);
    esc(f, model_path);
    fprintf(f, "</code><br>Evaluated on %d studies, %d series, %zu slices.", e->nstudies,
            e->nseries, e->nslices);
    if (data_desc) {
        fputs("<br>Data: ", f);
        esc(f, data_desc);
    }
    fputs("</p>", f);

    /* The table: per level and model, per label. */
    fputs("<h2>Metrics (study = max over the slices of all its "
          "series)</h2><table><tr><th>level</th><th>model</th>"
          "<th>label</th><th>n</th><th>pos</th><th>accuracy</th><th>sensitivity</th>"
          "<th>specificity</th><th>precision</th><th>AUC</th><th>threshold</th></tr>",
          f);
    for (int lv = 0; lv < 2; lv++)
        for (int mo = 0; mo < 2; mo++) {
            for (int l = 0; l < TRAIN_LABELS; l++) {
                const struct train_binary *b = &e->m[lv][mo][l];
                fprintf(f, "<tr><td>%s</td><td>%s</td><td>%s</td><td>%zu</td><td>%zu</td>",
                        level_names[lv], model_names[mo], names[l], b->n, b->pos);
                double v[] = {b->accuracy,  b->sensitivity, b->specificity,
                              b->precision, b->auc,         e->thresholds[mo][l]};
                /* sensitivity, specificity, AUC: their 95% interval below, where known */
                double lo[] = {NAN, b->sens_lo, b->spec_lo, NAN, b->auc_lo, NAN};
                double hi[] = {NAN, b->sens_hi, b->spec_hi, NAN, b->auc_hi, NAN};
                for (int i = 0; i < 6; i++) {
                    if (isnan(v[i])) {
                        fputs("<td>&ndash;</td>", f);
                        continue;
                    }
                    fprintf(f, "<td>%.3f", v[i]);
                    if (!isnan(lo[i]) && !isnan(hi[i]))
                        fprintf(f, "<br><small>%.3f&ndash;%.3f</small>", lo[i], hi[i]);
                    fputs("</td>", f);
                }
                fputs("</tr>", f);
            }
            char wl[32];
            fprintf(f,
                    "<tr><td>%s</td><td>%s</td><td colspan='9' style='text-align:left'>RSNA "
                    "weighted log loss %s</td></tr>",
                    level_names[lv], model_names[mo],
                    train_num(wl, "%.4f", e->weighted_logloss[lv][mo]));
        }
    fputs("</table><p>Under a study-level figure, its 95% confidence interval: DeLong's for the "
          "AUC, Wilson's for sensitivity and specificity. None per slice: the slices of a "
          "series are not independent, and intervals that assume they are would be too "
          "narrow.",
          f);
    for (int mo = 0, said = 0; mo < 2 && !said; mo++)
        if ((said = e->m[TRAIN_LEVEL_STUDY][mo][0].auc_ci_bound)) fputs(" " AUC_BOUND_NOTE ".", f);
    fputs("</p>", f);
    if (e->cmp.valid) {
        const struct train_compare *c = &e->cmp;
        char x[8][32];
        fputs("<h2>Compared with another model</h2><p>", f);
        esc(f, c->model);
        fprintf(f,
                ", on the same %d studies (study level, LRCN, &ldquo;any&rdquo;): AUC %s here "
                "against %s there, a difference of %s (95%% interval %s to %s, "
                "p&nbsp;=&nbsp;%s by DeLong's test for two models scored on the same "
                "studies%s). At its own stored threshold the other model has sensitivity %s "
                "and specificity %s.</p>",
                e->nstudies, train_num(x[0], "%.3f", c->auc.auc_a),
                train_num(x[1], "%.3f", c->auc.auc_b), train_num(x[2], "%+.3f", c->auc.diff),
                train_num(x[3], "%+.3f", c->auc.lo), train_num(x[4], "%+.3f", c->auc.hi),
                train_num(x[5], "%.3g", c->auc.p), paired_na(e),
                train_num(x[6], "%.3f", c->sensitivity), train_num(x[7], "%.3f", c->specificity));
    }

    /* ROC curves of "any". */
    fputs("<h2>ROC, any hemorrhage</h2>", f);
    for (int lv = 0; lv < 2; lv++) {
        char t[64];
        snprintf(t, sizeof t, "ROC any, %s level", level_names[lv]);
        svg_axes(f, t, "1 - specificity", "sensitivity");
        fprintf(f,
                "<line x1='%.1f' y1='%.1f' x2='%.1f' y2='%.1f' stroke='#bbb' "
                "stroke-dasharray='3'/>",
                sx(0, 0, 1), sy(0, 0, 1), sx(1, 0, 1), sy(1, 0, 1));
        for (int mo = 0; mo < 2; mo++) {
            svg_poly(f, e->roc_fpr[lv][mo], e->roc_tpr[lv][mo], e->roc_n[lv][mo], 0, 1, 0, 1,
                     colors[mo]);
            char lb[64];
            double auc = e->m[lv][mo][0].auc;
            if (isnan(auc))
                snprintf(lb, sizeof lb, "%s AUC n/a", model_names[mo]);
            else
                snprintf(lb, sizeof lb, "%s AUC %.3f", model_names[mo], auc);
            svg_legend(f, mo, lb);
        }
        fputs("</svg>", f);
    }

    /* Confusion matrix at the stored threshold, study level, LRCN. */
    const struct train_binary *b = &e->m[TRAIN_LEVEL_STUDY][TRAIN_MODEL_LRCN][0];
    fprintf(f,
            "<h2>Confusion matrix, study level, LRCN, any (threshold %.3f)</h2>"
            "<svg xmlns='http://www.w3.org/2000/svg' width='290' height='170'>"
            "<text x='180' y='14' font-size='11' text-anchor='middle'>truth</text>"
            "<text x='140' y='30' font-size='11' text-anchor='middle'>hemorrhage</text>"
            "<text x='230' y='30' font-size='11' text-anchor='middle'>none</text>"
            "<text x='4' y='75' font-size='11'>flagged</text>"
            "<text x='4' y='135' font-size='11'>not flagged</text>",
            e->thresholds[1][0]);
    size_t cells[4] = {b->tp, b->fp, b->fn, b->tn};
    const char *fill[4] = {"#cfc", "#fdd", "#fcc", "#dfd"};
    for (int i = 0; i < 4; i++) {
        int x = 98 + (i % 2) * 90, y = 40 + (i / 2) * 60;
        fprintf(f,
                "<rect x='%d' y='%d' width='85' height='55' fill='%s' stroke='#888'/>"
                "<text x='%d' y='%d' font-size='18' text-anchor='middle'>%zu</text>",
                x, y, fill[i], x + 42, y + 34, cells[i]);
    }
    fputs("</svg>", f);

    /* Training history. */
    if (nh > 0) {
        fputs("<h2>Training history</h2>", f);
        for (int what = 0; what < 2; what++) {
            double hi = 0;
            for (int i = 0; i < nh; i++) {
                double v = what ? h[i].val_auc : fmax(h[i].train_loss, h[i].val_loss);
                if (!isnan(v) && v > hi) hi = v;
            }
            double lo = 0;
            if (what && hi < 1) hi = 1;
            char t[96];
            snprintf(t, sizeof t, "validation %s per epoch", val_auc ? val_auc : "AUC");
            svg_axes(f, what ? t : "loss per epoch", "epoch (stage 1, then stage 2)",
                     what ? "AUC" : "loss");
            float xs[512], ys[2][512];
            int k = nh < 512 ? nh : 512;
            for (int i = 0; i < k; i++) {
                xs[i] = (float)i;
                ys[0][i] = (float)(what ? h[i].val_auc : h[i].train_loss);
                ys[1][i] = (float)h[i].val_loss;
            }
            svg_poly(f, xs, ys[0], k, 0, k > 1 ? k - 1 : 1, lo, hi, colors[0]);
            svg_legend(f, 0, what ? "validation AUC" : "training loss");
            if (!what) {
                svg_poly(f, xs, ys[1], k, 0, k > 1 ? k - 1 : 1, lo, hi, colors[1]);
                svg_legend(f, 1, "validation loss");
            }
            for (int i = 1; i < k; i++)
                if (h[i].stage != h[i - 1].stage)
                    fprintf(f,
                            "<line x1='%.1f' y1='20' x2='%.1f' y2='%d' stroke='#999' "
                            "stroke-dasharray='2'/>",
                            sx(i - 0.5, 0, k - 1), sx(i - 0.5, 0, k - 1), H - PAD);
            fputs("</svg>", f);
        }
    }

    /* Reliability diagram. */
    if (rel && rel->valid) {
        fputs("<h2>Calibration (validation, study level, any)</h2>", f);
        svg_axes(f, "reliability diagram", "predicted probability", "observed rate");
        fprintf(f,
                "<line x1='%.1f' y1='%.1f' x2='%.1f' y2='%.1f' stroke='#bbb' "
                "stroke-dasharray='3'/>",
                sx(0, 0, 1), sy(0, 0, 1), sx(1, 0, 1), sy(1, 0, 1));
        for (int c = 0; c < 2; c++) {
            float xs[10], ys[10];
            int k = 0;
            for (int i = 0; i < 10; i++)
                if (rel->count[c][i])
                    xs[k] = (float)rel->pred[c][i], ys[k++] = (float)rel->obs[c][i];
            svg_poly(f, xs, ys, k, 0, 1, 0, 1, colors[c + 2]);
            for (int i = 0; i < k; i++)
                fprintf(f, "<circle cx='%.1f' cy='%.1f' r='2.5' fill='%s'/>", sx(xs[i], 0, 1),
                        sy(ys[i], 0, 1), colors[c + 2]);
            char lb[64];
            snprintf(lb, sizeof lb, c ? "after, T=%.2f" : "before", rel->temperature[0]);
            svg_legend(f, c + 2, lb);
        }
        fputs("</svg>", f);
    }
    fprintf(f, "<p class='n'>%s</p></body></html>\n", NOTICE);
    if (fclose(f) != 0) {
        snprintf(err, errlen, "%s: cannot write", html_path);
        return -1;
    }
    return 0;
}

/* nn/adam.c: Adam and AdamW over the model's one parameter buffer, as
 * torch.optim.Adam / AdamW compute them; the update itself runs on the
 * model's backend, tensor by tensor (frozen ones are skipped). */
#include "model_internal.h"

#include <math.h>

void nn_adam_default(nn_adam *a)
{
    a->lr = 1e-4f;
    a->beta1 = 0.9f;
    a->beta2 = 0.999f;
    a->eps = 1e-8f;
    a->weight_decay = 0.0f;
    a->decoupled = 0;
}

void nn_adam_update(float *p, const float *g, float *mm, float *vv, size_t n,
                    const nn_adam_hyper *h)
{
    for (size_t k = 0; k < n; k++) {
        float gk = g[k];
        if (h->weight_decay != 0.0f) {
            if (h->decoupled)
                p[k] *= 1.0f - h->lr * h->weight_decay;
            else
                gk += h->weight_decay * p[k];
        }
        mm[k] = h->beta1 * mm[k] + (1.0f - h->beta1) * gk;
        vv[k] = h->beta2 * vv[k] + (1.0f - h->beta2) * gk * gk;
        p[k] -= h->step * mm[k] / (sqrtf(vv[k]) / h->bc2 + h->eps);
    }
}

void nn_model_adam_step(nn_model *m, const nn_adam *a)
{
    m->adam_t++;
    nn_adam_hyper h = {
        .lr = a->lr,
        .beta1 = a->beta1,
        .beta2 = a->beta2,
        .eps = a->eps,
        .weight_decay = a->weight_decay,
        .decoupled = a->decoupled,
        .step = a->lr / (1.0f - powf(a->beta1, (float)m->adam_t)),
        .bc2 = sqrtf(1.0f - powf(a->beta2, (float)m->adam_t)),
    };
    for (int i = 0; i < m->ntensors; i++) {
        nn_tensor *t = &m->tensors[i];
        if (t->is_buffer || t->frozen) continue;
        m->be->adam_update(m->bctx, m->bparams + t->off, m->bgrads + t->off, m->badam_m + t->off,
                           m->badam_v + t->off, t->numel, &h);
    }
}

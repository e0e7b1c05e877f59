/* nn/adam.c: Adam and AdamW over the model's one parameter buffer, as
 * torch.optim.Adam / AdamW compute them. */
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

void nn_model_adam_step(nn_model *m, const nn_adam *a)
{
    m->adam_t++;
    float bc1 = 1.0f - powf(a->beta1, (float)m->adam_t);
    float bc2 = sqrtf(1.0f - powf(a->beta2, (float)m->adam_t));
    float step = a->lr / bc1;
    for (int i = 0; i < m->ntensors; i++) {
        nn_tensor *t = &m->tensors[i];
        if (t->is_buffer || t->frozen) continue;
        float *p = m->params + t->off, *g = m->grads + t->off;
        float *mm = m->adam_m + t->off, *vv = m->adam_v + t->off;
        for (size_t k = 0; k < t->numel; k++) {
            float gk = g[k];
            if (a->weight_decay != 0.0f) {
                if (a->decoupled)
                    p[k] *= 1.0f - a->lr * a->weight_decay;
                else
                    gk += a->weight_decay * p[k];
            }
            mm[k] = a->beta1 * mm[k] + (1.0f - a->beta1) * gk;
            vv[k] = a->beta2 * vv[k] + (1.0f - a->beta2) * gk * gk;
            p[k] -= step * mm[k] / (sqrtf(vv[k]) / bc2 + a->eps);
        }
    }
}

/* The model registry under <store.dir>/models: every trained model kept as
 * <id>.safetensors (its provenance and metrics in its metadata), the one the
 * node loads as active.safetensors, and the promotions in active.log so that
 * a rollback can put the previous one back. Promotion is a person's decision:
 * `ichtriage model promote ID`. */
#ifndef TRAIN_REGISTRY_H
#define TRAIN_REGISTRY_H

#include <stddef.h>

/* Copies model_path into the registry as a new id (written to id). Returns 0
 * or -1 with a message. */
int train_registry_add(const char *store_dir, const char *model_path, char *id, size_t idn,
                       char *err, size_t errlen);
/* Makes id the active model (atomic replace of active.safetensors). */
int train_registry_promote(const char *store_dir, const char *id, char *err, size_t errlen);
/* Puts back the model that was active before the current one. */
int train_registry_rollback(const char *store_dir, char *id, size_t idn, char *err, size_t errlen);
/* The id of the active model ("" when none). */
int train_registry_active(const char *store_dir, char *id, size_t idn);

#endif

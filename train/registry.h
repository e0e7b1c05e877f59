/* The model registry under <store.dir>/models: every trained model kept as
 * <id>.safetensors (its provenance and metrics in its metadata), the one the
 * node loads as active.safetensors, and the promotions in active.log so that
 * a rollback can put the previous one back. Promotion is a person's decision:
 * `ichtriage model promote ID`. */
#ifndef TRAIN_REGISTRY_H
#define TRAIN_REGISTRY_H

#include <stddef.h>
#include <stdint.h>

/* Copies model_path into the registry as a new id (written to id). Returns 0
 * or -1 with a message. */
int train_registry_add(const char *store_dir, const char *model_path, char *id, size_t idn,
                       char *err, size_t errlen);
/* Makes id the active model (atomic replace of active.safetensors). */
int train_registry_promote(const char *store_dir, const char *id, char *err, size_t errlen);
/* The same, only while the active model is still was (its id, "" for none):
 * automatic promotion compared the new model with was, and an admin's
 * promote or rollback meanwhile must stand. Returns 0, -1 with a message,
 * or TRAIN_REGISTRY_CHANGED (nothing done; err names the active one). */
#define TRAIN_REGISTRY_CHANGED (-2)
int train_registry_promote_over(const char *store_dir, const char *id, const char *was, char *err,
                                size_t errlen);
/* Puts back the model that was active before the current one. */
int train_registry_rollback(const char *store_dir, char *id, size_t idn, char *err, size_t errlen);
/* The id of the active model ("" when none). */
int train_registry_active(const char *store_dir, char *id, size_t idn);

/* The frozen test split: <store.dir>/models/test-patients.txt, one patient ID
 * per line, written by the first registered training run that held patients
 * out for testing. Every later registered run keeps exactly these patients out
 * of training and validation and scores old and new models on them, so that
 * models are compared on the same studies across runs. */
/* Reads it into *ids (n entries, free with train_registry_free_ids). Returns
 * 1 when the file exists, 0 when there is none yet, -1 with a message. */
int train_registry_test_patients(const char *store_dir, char ***ids, int *n, char *err,
                                 size_t errlen);
/* Writes it (temporary file, fsync, rename) unless it exists already. */
int train_registry_freeze_test(const char *store_dir, char *const *ids, int n, char *err,
                               size_t errlen);
void train_registry_free_ids(char **ids, int n);

struct train_dataset;
/* Splits d by patient (train_dataset_split) and then moves the store's
 * frozen test patients, when it has any, into the test split: every run and
 * evaluation on this store's data, registered or not, keeps them out of
 * training (event=test_split). Returns the number of frozen patients (0
 * without the file), or -1 with a message. */
int train_registry_split(struct train_dataset *d, const char *store_dir, uint64_t seed,
                         double val_frac, double test_frac, char *err, size_t errlen);

#endif

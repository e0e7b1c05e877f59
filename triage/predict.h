/* `ichtriage predict PATH... [--json]`: the triage pipeline on files or
 * folders, without a server. */
#ifndef TRIAGE_PREDICT_H
#define TRIAGE_PREDICT_H

int triage_predict_main(int argc, char **argv);

#endif

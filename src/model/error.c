/* error.c - the model's error message (a thread-local buffer, like libmoda's own). */
#include "model.h"

#include <stdarg.h>
#include <stdio.h>

static _Thread_local char model_message[1024];

moda_status moda_model_fail(moda_status status, const char *fmt, ...) {
    char tmp[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(tmp, sizeof tmp, fmt, ap); /* fmt's arguments may point into model_message itself */
    va_end(ap);
    snprintf(model_message, sizeof model_message, "%s", tmp);
    return status;
}

const char *moda_model_error(void) { return model_message; }

/* What logd/_hot.c and logd/_lane.c (one extension module, logd._hot) share. */
#ifndef LOGD_HOT_H
#define LOGD_HOT_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

/* Append to ``out`` the bodies (a list each) of the complete MSG commands at
 * d[pos:], one after another; return the position after the last one taken,
 * or -1 with an exception set (_hot.c, msg_commands). */
Py_ssize_t take_msg_run(const char *d, Py_ssize_t size, Py_ssize_t pos, Py_ssize_t max_line, long long max_message,
                        long long max_batch, long long max_batch_bytes, PyObject *out);

/* Add the Lane and Hub types and the ack_round and gather functions to the module (_lane.c). */
int lane_add_types(PyObject *module);

#endif

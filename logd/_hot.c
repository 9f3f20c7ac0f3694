/*
 * logd._hot: the per-record and per-command loops of logd's hot paths, in C:
 * MSG parsing, record encoding, and the record checks of followers and clients.
 *
 * Each function here has a pure-Python twin next to its caller, and the twin
 * is the reference: tests/test_hot.py checks that both give the same result
 * on random and corrupted input, and LOGD_NO_EXTENSIONS=1 runs logd on the
 * twins alone. This module only makes the common case fast. Where input is
 * not what the common case expects (a record that is cut off, malformed or
 * fails its CRC, a body that is not bytes) it stops and hands the position
 * back, and the Python code takes it from there with its exact error
 * messages. So nothing here raises a protocol or storage error of its own.
 *
 * The connection's MSG lane (the Lane and Hub types, ack_round, gather) is in
 * _lane.c, built into this module.
 *
 * Record format (protocol.md section 1): "+<id> <len> <crc>\r\n<body>\r\n",
 * id and len in canonical decimal, crc the CRC-32C of the body as 8
 * lowercase hex digits.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#include "_hot.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <nmmintrin.h>
#define HAVE_SSE42_CRC 1
#endif

/* "+" + 19 digits + " " + 19 digits + " " + 8 hex + "\r\n", as record.py. */
#define MAX_HEADER 51
/* Bodies at least this long go to the crc32c package, whose interleaved
 * hardware loop is about three times faster than the single stream below;
 * under it, the cost of calling into Python would dominate. */
#define BIG_BODY 4096

/* --- CRC-32C ---------------------------------------------------------------- */

static uint32_t crc_table[8][256];
static int have_hw_crc;
static PyObject *py_crc32c; /* crc32c.crc32c, for big bodies */

static void
crc_init(void)
{
    /* Slicing-by-8 tables for the reflected Castagnoli polynomial. */
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
        crc_table[0][i] = c;
    }
    for (int t = 1; t < 8; t++)
        for (uint32_t i = 0; i < 256; i++)
            crc_table[t][i] = (crc_table[t - 1][i] >> 8) ^ crc_table[0][crc_table[t - 1][i] & 0xff];
#ifdef HAVE_SSE42_CRC
    __builtin_cpu_init();
    have_hw_crc = __builtin_cpu_supports("sse4.2") != 0;
#endif
}

static uint32_t
crc_soft(uint32_t crc, const unsigned char *p, size_t n)
{
    while (n >= 8) {
        uint32_t lo = crc ^ ((uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24);
        crc = crc_table[7][lo & 0xff] ^ crc_table[6][(lo >> 8) & 0xff] ^ crc_table[5][(lo >> 16) & 0xff] ^
              crc_table[4][lo >> 24] ^ crc_table[3][p[4]] ^ crc_table[2][p[5]] ^ crc_table[1][p[6]] ^
              crc_table[0][p[7]];
        p += 8;
        n -= 8;
    }
    while (n--)
        crc = (crc >> 8) ^ crc_table[0][(crc ^ *p++) & 0xff];
    return crc;
}

#ifdef HAVE_SSE42_CRC
__attribute__((target("sse4.2"))) static uint32_t
crc_hard(uint32_t crc, const unsigned char *p, size_t n)
{
    uint64_t c = crc;
    while (n >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        c = _mm_crc32_u64(c, v);
        p += 8;
        n -= 8;
    }
    crc = (uint32_t)c;
    while (n--)
        crc = _mm_crc32_u8(crc, *p++);
    return crc;
}
#endif

/* CRC-32C of a body; -1 with an exception set if the crc32c package failed. */
static int64_t
crc_of(const unsigned char *p, Py_ssize_t n)
{
    if (n >= BIG_BODY && py_crc32c != NULL) {
        PyObject *view = PyMemoryView_FromMemory((char *)p, n, PyBUF_READ);
        if (view == NULL)
            return -1;
        PyObject *r = PyObject_CallOneArg(py_crc32c, view);
        Py_DECREF(view);
        if (r == NULL)
            return -1;
        unsigned long v = PyLong_AsUnsignedLong(r);
        Py_DECREF(r);
        if (v == (unsigned long)-1 && PyErr_Occurred())
            return -1;
        return (int64_t)(v & 0xffffffffu);
    }
#ifdef HAVE_SSE42_CRC
    if (have_hw_crc)
        return ~crc_hard(0xffffffffu, p, (size_t)n) & 0xffffffffu;
#endif
    return ~crc_soft(0xffffffffu, p, (size_t)n) & 0xffffffffu;
}

/* --- header formatting --------------------------------------------------------- */

static const char HEX[] = "0123456789abcdef";

static inline int
decimal_width(uint64_t v)
{
    int w = 1;
    while (v >= 10) {
        v /= 10;
        w++;
    }
    return w;
}

/* Write v in decimal at out (exactly `width` digits); return the end. */
static inline char *
put_decimal(char *out, uint64_t v, int width)
{
    char *end = out + width;
    char *q = end;
    do {
        *--q = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    return end;
}

/* Add one to the `width` decimal digits at buf; return the new width. */
static inline int
increment_decimal(char *buf, int width)
{
    int i = width - 1;
    while (i >= 0 && buf[i] == '9')
        buf[i--] = '0';
    if (i >= 0) {
        buf[i]++;
        return width;
    }
    memmove(buf + 1, buf, (size_t)width);
    buf[0] = '1';
    return width + 1;
}

/* Write "+<id> <len> <crc>\r\n" at out; return the end. */
static inline char *
put_header(char *out, const char *id, int id_width, uint64_t len, uint32_t crc)
{
    *out++ = '+';
    memcpy(out, id, (size_t)id_width);
    out += id_width;
    *out++ = ' ';
    out = put_decimal(out, len, decimal_width(len));
    *out++ = ' ';
    for (int shift = 28; shift >= 0; shift -= 4)
        *out++ = HEX[(crc >> shift) & 0xf];
    *out++ = '\r';
    *out++ = '\n';
    return out;
}

/* --- encode_batch ---------------------------------------------------------------- */

PyDoc_STRVAR(encode_batch_doc,
             "encode_batch(first_id, bodies, base_offset) -> (records, offsets) or None\n\n"
             "The records of ``bodies`` (a list of bytes) with ids from ``first_id``, joined,\n"
             "and each record's offset from ``base_offset`` as native unsigned 64-bit\n"
             "integers (``array('Q').frombytes`` takes them). None when a body is not\n"
             "bytes: the caller's Python loop handles that.");

static PyObject *
encode_batch(PyObject *self, PyObject *args)
{
    unsigned long long first_id, base;
    PyObject *list;
    if (!PyArg_ParseTuple(args, "KO!K", &first_id, &PyList_Type, &list, &base))
        return NULL;
    /* A tuple of the bodies, so the sizes summed in the first pass are the
     * ones copied in the second, whatever happens to the list meanwhile
     * (the crc32c call for big bodies may let other threads run). */
    PyObject *bodies = PyList_AsTuple(list);
    if (bodies == NULL)
        return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(bodies);
    /* First pass: sizes, so the output is allocated once. The id width only
     * changes at powers of ten. */
    Py_ssize_t total = 0;
    uint64_t id = first_id;
    int id_width = decimal_width(id);
    uint64_t bump = 1;
    for (int i = 0; i < id_width; i++)
        bump *= 10;
    for (Py_ssize_t i = 0; i < n; i++, id++) {
        PyObject *body = PyTuple_GET_ITEM(bodies, i);
        if (!PyBytes_CheckExact(body)) {
            Py_DECREF(bodies);
            Py_RETURN_NONE;
        }
        if (id == bump) {
            id_width++;
            bump *= 10;
        }
        Py_ssize_t len = PyBytes_GET_SIZE(body);
        total += 1 + id_width + 1 + decimal_width((uint64_t)len) + 1 + 8 + 2 + len + 2;
    }
    PyObject *records = PyBytes_FromStringAndSize(NULL, total);
    PyObject *offsets = PyBytes_FromStringAndSize(NULL, n * (Py_ssize_t)sizeof(uint64_t));
    if (records == NULL || offsets == NULL)
        goto fail;
    char *start = PyBytes_AS_STRING(records);
    char *out = start;
    uint64_t *offs = (uint64_t *)PyBytes_AS_STRING(offsets);
    char idbuf[24];
    id_width = decimal_width(first_id);
    put_decimal(idbuf, first_id, id_width);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *body = PyTuple_GET_ITEM(bodies, i);
        const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(body);
        Py_ssize_t len = PyBytes_GET_SIZE(body);
        if (i)
            id_width = increment_decimal(idbuf, id_width);
        int64_t crc = crc_of(p, len);
        if (crc < 0)
            goto fail;
        offs[i] = base + (uint64_t)(out - start);
        out = put_header(out, idbuf, id_width, (uint64_t)len, (uint32_t)crc);
        memcpy(out, p, (size_t)len);
        out += len;
        *out++ = '\r';
        *out++ = '\n';
    }
    Py_DECREF(bodies);
    return Py_BuildValue("(NN)", records, offsets);
fail:
    Py_DECREF(bodies);
    Py_XDECREF(records);
    Py_XDECREF(offsets);
    return NULL;
}

/* --- verify_records ------------------------------------------------------------- */

/* Parse canonical decimal digits at p (no leading zero but "0"), up to 19,
 * ended by `stop`; set *value and return the position of `stop`, or NULL. */
static const unsigned char *
take_decimal(const unsigned char *p, const unsigned char *end, unsigned char stop, uint64_t *value)
{
    const unsigned char *q = p;
    uint64_t v = 0;
    while (q < end && *q >= '0' && *q <= '9' && q - p < 19) {
        v = v * 10 + (uint64_t)(*q - '0');
        q++;
    }
    if (q == p || q >= end || *q != stop || (*p == '0' && q - p > 1))
        return NULL;
    *value = v;
    return q;
}

/* The record at p, if it is whole in [p, end), well formed and has the id in
 * idbuf (id_width digits) and a matching CRC: sets *body, *len and *after (its
 * trailing CRLF) and returns 1. Returns 0 where the Python code must decide
 * (cut off, malformed, another id, a CRC mismatch), -1 with an exception set. */
static int
take_record(const unsigned char *p, const unsigned char *end, const char *idbuf, int id_width,
            const unsigned char **body_out, uint64_t *len_out, const unsigned char **after_out)
{
    Py_ssize_t room = end - p < MAX_HEADER ? end - p : MAX_HEADER;
    const unsigned char *nl = memchr(p, '\n', (size_t)room);
    if (nl == NULL)
        return 0;
    /* "+<id> " */
    if (nl - p < id_width + 2 || memcmp(p + 1, idbuf, (size_t)id_width) != 0 || p[1 + id_width] != ' ')
        return 0;
    uint64_t len;
    const unsigned char *q = take_decimal(p + 2 + id_width, nl, ' ', &len);
    /* " <8 hex>\r\n": the space is at q, the LF must be 10 bytes later. */
    if (q == NULL || nl - q != 10 || nl[-1] != '\r')
        return 0;
    uint32_t crc = 0;
    for (const unsigned char *h = q + 1; h < q + 9; h++) {
        unsigned c = *h;
        if (c >= '0' && c <= '9')
            crc = crc << 4 | (c - '0');
        else if (c >= 'a' && c <= 'f')
            crc = crc << 4 | (c - 'a' + 10);
        else
            return 0;
    }
    const unsigned char *body = nl + 1;
    if (len > (uint64_t)(end - body) || end - body - (Py_ssize_t)len < 2)
        return 0;
    const unsigned char *after = body + len;
    if (after[0] != '\r' || after[1] != '\n')
        return 0;
    int64_t actual = crc_of(body, (Py_ssize_t)len);
    if (actual < 0)
        return -1;
    if ((uint32_t)actual != crc)
        return 0;
    *body_out = body;
    *len_out = len;
    *after_out = after;
    return 1;
}

PyDoc_STRVAR(verify_records_doc,
             "verify_records(data, pos, next_id, bodies=None) -> (end, count, offsets)\n\n"
             "Check consecutive records in ``data`` from ``pos``, the first with id\n"
             "``next_id``: canonical header, id in sequence, CRLF after the body, CRC.\n"
             "Stops at the first record that is incomplete or fails a check (or at\n"
             "anything that is not a record) and returns where it stopped, how many\n"
             "records it passed, and their offsets from ``pos`` as native unsigned\n"
             "64-bit integers. Whether the stop is an error is for the caller to say.\n"
             "With a list as ``bodies``, each passed record's body is appended to it.");

static PyObject *
verify_records(PyObject *self, PyObject *args)
{
    Py_buffer buf;
    Py_ssize_t pos;
    unsigned long long next_id;
    PyObject *bodies = Py_None;
    if (!PyArg_ParseTuple(args, "y*nK|O", &buf, &pos, &next_id, &bodies))
        return NULL;
    if (bodies != Py_None && !PyList_Check(bodies)) {
        PyBuffer_Release(&buf);
        PyErr_SetString(PyExc_TypeError, "bodies must be a list or None");
        return NULL;
    }
    const unsigned char *data = buf.buf;
    const unsigned char *end = data + buf.len;
    if (pos < 0 || pos > buf.len) {
        PyBuffer_Release(&buf);
        PyErr_SetString(PyExc_ValueError, "pos out of range");
        return NULL;
    }
    /* Offsets go into a growing C array, copied into bytes at the end. */
    Py_ssize_t cap = 1024, count = 0;
    uint64_t *offs = PyMem_Malloc((size_t)cap * sizeof(uint64_t));
    if (offs == NULL) {
        PyBuffer_Release(&buf);
        return PyErr_NoMemory();
    }
    char idbuf[24];
    int id_width = decimal_width(next_id);
    put_decimal(idbuf, next_id, id_width);
    const unsigned char *p = data + pos;
    while (end - p >= 2 && p[0] == '+' && p[1] >= '0' && p[1] <= '9') {
        const unsigned char *body, *after;
        uint64_t len;
        int taken = take_record(p, end, idbuf, id_width, &body, &len, &after);
        if (taken < 0) {
            PyMem_Free(offs);
            PyBuffer_Release(&buf);
            return NULL;
        }
        if (taken == 0)
            break;
        if (count == cap) {
            uint64_t *grown = PyMem_Realloc(offs, (size_t)cap * 2 * sizeof(uint64_t));
            if (grown == NULL) {
                PyMem_Free(offs);
                PyBuffer_Release(&buf);
                return PyErr_NoMemory();
            }
            offs = grown;
            cap *= 2;
        }
        if (bodies != Py_None) {
            PyObject *b = PyBytes_FromStringAndSize((const char *)body, (Py_ssize_t)len);
            if (b == NULL || PyList_Append(bodies, b) < 0) {
                Py_XDECREF(b);
                PyMem_Free(offs);
                PyBuffer_Release(&buf);
                return NULL;
            }
            Py_DECREF(b);
        }
        offs[count++] = (uint64_t)(p - (data + pos));
        p = after + 2;
        id_width = increment_decimal(idbuf, id_width);
    }
    Py_ssize_t stop = p - data;
    PyBuffer_Release(&buf);
    PyObject *offsets = PyBytes_FromStringAndSize((const char *)offs, count * (Py_ssize_t)sizeof(uint64_t));
    PyMem_Free(offs);
    if (offsets == NULL)
        return NULL;
    return Py_BuildValue("(nnN)", stop, count, offsets);
}

/* --- rebase ------------------------------------------------------------------------ */

PyDoc_STRVAR(rebase_doc,
             "rebase(offsets, delta) -> bytes\n\n"
             "Native unsigned 64-bit offsets (bytes or an array('Q')) with ``delta`` added\n"
             "to each, as bytes.");

static PyObject *
rebase(PyObject *self, PyObject *args)
{
    Py_buffer buf;
    unsigned long long delta;
    if (!PyArg_ParseTuple(args, "y*K", &buf, &delta))
        return NULL;
    if (buf.len % (Py_ssize_t)sizeof(uint64_t)) {
        PyBuffer_Release(&buf);
        PyErr_SetString(PyExc_ValueError, "offsets are not whole 64-bit integers");
        return NULL;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, buf.len);
    if (out != NULL) {
        Py_ssize_t n = buf.len / (Py_ssize_t)sizeof(uint64_t);
        const char *src = buf.buf;
        uint64_t *dst = (uint64_t *)PyBytes_AS_STRING(out);
        for (Py_ssize_t i = 0; i < n; i++) {
            uint64_t v;
            memcpy(&v, src + i * (Py_ssize_t)sizeof(uint64_t), sizeof v);
            dst[i] = v + delta;
        }
    }
    PyBuffer_Release(&buf);
    return out;
}

/* --- MSG parsing ------------------------------------------------------------------- */

/* The lengths of a MSG line, [p, end): decimal numbers of at most 18 digits
 * separated by single spaces, within the three limits. Stores them in *lens
 * (grown as needed) and returns how many; 0 for a line C leaves to Python;
 * -1 with MemoryError set. */
static Py_ssize_t
parse_lengths(const unsigned char *p, const unsigned char *end, long long max_message, long long max_batch,
              long long max_batch_bytes, long long **lens, Py_ssize_t *cap)
{
    long long total = 0;
    Py_ssize_t count = 0;
    while (p < end) {
        const unsigned char *q = p;
        long long v = 0;
        while (q < end && *q >= '0' && *q <= '9') {
            if (q - p == 18) /* a 19th digit: not a length any server takes */
                return 0;
            v = v * 10 + (*q - '0');
            q++;
        }
        /* A token must have digits and end the line or be followed by one space
         * and another token. */
        if (q == p || (q < end && (*q != ' ' || q + 1 == end)))
            return 0;
        /* total stays <= max_batch_bytes, so the subtraction cannot overflow. */
        if (v > max_message || v > max_batch_bytes - total || count >= max_batch)
            return 0;
        total += v;
        if (count == *cap) {
            Py_ssize_t grown_cap = *cap ? *cap * 2 : 16;
            long long *grown = PyMem_Realloc(*lens, (size_t)grown_cap * sizeof(long long));
            if (grown == NULL) {
                PyErr_NoMemory();
                return -1;
            }
            *lens = grown;
            *cap = grown_cap;
        }
        (*lens)[count++] = v;
        p = q < end ? q + 1 : q;
    }
    return count;
}

PyDoc_STRVAR(msg_lengths_doc,
             "msg_lengths(rest, max_message, max_batch, max_batch_bytes) -> list[int] or None\n\n"
             "The lengths of a MSG line (what follows \"MSG \"): decimal numbers of at most\n"
             "18 digits separated by single spaces, within the three limits. None for\n"
             "anything else; the caller's Python code says what is wrong with it.");

static PyObject *
msg_lengths(PyObject *self, PyObject *args)
{
    PyObject *rest;
    long long max_message, max_batch, max_batch_bytes;
    if (!PyArg_ParseTuple(args, "O!LLL", &PyBytes_Type, &rest, &max_message, &max_batch, &max_batch_bytes))
        return NULL;
    const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(rest);
    long long *lens = NULL;
    Py_ssize_t cap = 0;
    Py_ssize_t n = parse_lengths(p, p + PyBytes_GET_SIZE(rest), max_message, max_batch, max_batch_bytes, &lens, &cap);
    PyObject *out = NULL;
    if (n == 0) {
        out = Py_NewRef(Py_None);
    } else if (n > 0 && (out = PyList_New(n)) != NULL) {
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *v = PyLong_FromLongLong(lens[i]);
            if (v == NULL) {
                Py_CLEAR(out);
                break;
            }
            PyList_SET_ITEM(out, i, v);
        }
    }
    PyMem_Free(lens);
    return out;
}

/* Where the body of length n at pos ends with its terminator (CRLF, or a bare
 * LF), or -1 if it is incomplete or badly ended (Python's to handle). */
static inline Py_ssize_t
body_end(const char *d, Py_ssize_t size, Py_ssize_t pos, long long n)
{
    if (n > size - pos)
        return -1;
    Py_ssize_t end = pos + (Py_ssize_t)n;
    if (end + 1 < size && d[end] == '\r' && d[end + 1] == '\n')
        return end + 2;
    if (end < size && d[end] == '\n')
        return end + 1;
    return -1;
}

PyDoc_STRVAR(msg_commands_doc,
             "msg_commands(data, pos, max_line, max_message, max_batch, max_batch_bytes)\n"
             "    -> (pos, [bodies, ...])\n\n"
             "The complete MSG commands at ``data[pos:]``, one after another: for each,\n"
             "the list of its bodies. Stops before the first command that is not a MSG\n"
             "spelled \"MSG \", not complete in ``data``, or not one ``msg_lengths`` and\n"
             "``take_bodies`` would take; the caller's Python loop goes on from there.");

/* Append to ``out`` the bodies (a list each) of the complete MSG commands at
 * d[pos:], one after another, as msg_commands describes; return the position
 * after the last one taken, or -1 with an exception set. */
Py_ssize_t
take_msg_run(const char *d, Py_ssize_t size, Py_ssize_t pos, Py_ssize_t max_line, long long max_message,
             long long max_batch, long long max_batch_bytes, PyObject *out)
{
    long long *lens = NULL;
    Py_ssize_t cap = 0;
    while (size - pos >= 4 && memcmp(d + pos, "MSG ", 4) == 0) {
        /* The line, LF included, must be shorter than max_line (as in Python). */
        Py_ssize_t room = size - pos < max_line ? size - pos : max_line;
        const char *nl = memchr(d + pos, '\n', (size_t)room);
        if (nl == NULL)
            break;
        const char *line_end = (nl > d + pos && nl[-1] == '\r') ? nl - 1 : nl;
        Py_ssize_t n = parse_lengths((const unsigned char *)d + pos + 4, (const unsigned char *)line_end,
                                     max_message, max_batch, max_batch_bytes, &lens, &cap);
        if (n < 0)
            goto error;
        if (n == 0)
            break;
        /* Check every body first, so an incomplete MSG costs no allocation. */
        Py_ssize_t q = nl - d + 1;
        for (Py_ssize_t i = 0; i < n && q >= 0; i++)
            q = body_end(d, size, q, lens[i]);
        if (q < 0)
            break;
        PyObject *bodies = PyList_New(n);
        if (bodies == NULL)
            goto error;
        q = nl - d + 1;
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *body = PyBytes_FromStringAndSize(d + q, (Py_ssize_t)lens[i]);
            if (body == NULL) {
                Py_DECREF(bodies);
                goto error;
            }
            PyList_SET_ITEM(bodies, i, body);
            q = body_end(d, size, q, lens[i]);
        }
        if (PyList_Append(out, bodies) < 0) {
            Py_DECREF(bodies);
            goto error;
        }
        Py_DECREF(bodies);
        pos = q;
    }
    PyMem_Free(lens);
    return pos;
error:
    PyMem_Free(lens);
    return -1;
}

static PyObject *
msg_commands(PyObject *self, PyObject *args)
{
    PyObject *data;
    Py_ssize_t pos, max_line;
    long long max_message, max_batch, max_batch_bytes;
    if (!PyArg_ParseTuple(args, "O!nnLLL", &PyBytes_Type, &data, &pos, &max_line, &max_message, &max_batch,
                          &max_batch_bytes))
        return NULL;
    Py_ssize_t size = PyBytes_GET_SIZE(data);
    if (pos < 0 || pos > size || max_line < 1) {
        PyErr_SetString(PyExc_ValueError, "pos or max_line out of range");
        return NULL;
    }
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    pos = take_msg_run(PyBytes_AS_STRING(data), size, pos, max_line, max_message, max_batch, max_batch_bytes, out);
    if (pos < 0) {
        Py_DECREF(out);
        return NULL;
    }
    return Py_BuildValue("(nN)", pos, out);
}

PyDoc_STRVAR(whole_msgs_doc,
             "whole_msgs(data, max_line, max_message, max_batch, max_batch_bytes)\n"
             "    -> [bodies, ...] or None\n\n"
             "msg_commands(data, 0, ...)[1] when those MSG commands are the whole of\n"
             "``data`` (at least one); None otherwise. The server session's fast lane\n"
             "(one MSG per packet from each of many clients), so it takes its arguments\n"
             "without a format string and builds no tuple.");

static PyObject *
whole_msgs(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5 || !PyBytes_CheckExact(args[0])) {
        PyErr_SetString(PyExc_TypeError, "whole_msgs(data: bytes, max_line, max_message, max_batch, max_batch_bytes)");
        return NULL;
    }
    Py_ssize_t max_line = PyLong_AsSsize_t(args[1]);
    long long max_message = PyLong_AsLongLong(args[2]);
    long long max_batch = PyLong_AsLongLong(args[3]);
    long long max_batch_bytes = PyLong_AsLongLong(args[4]);
    if (PyErr_Occurred())
        return NULL;
    if (max_line < 1) {
        PyErr_SetString(PyExc_ValueError, "max_line out of range");
        return NULL;
    }
    PyObject *data = args[0];
    Py_ssize_t size = PyBytes_GET_SIZE(data);
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    Py_ssize_t end = take_msg_run(PyBytes_AS_STRING(data), size, 0, max_line, max_message, max_batch,
                                  max_batch_bytes, out);
    if (end < 0) {
        Py_DECREF(out);
        return NULL;
    }
    if (end != size || PyList_GET_SIZE(out) == 0) {
        Py_DECREF(out);
        Py_RETURN_NONE;
    }
    return out;
}

PyDoc_STRVAR(take_bodies_doc,
             "take_bodies(data, pos, lengths, bodies) -> pos\n\n"
             "Append to the list ``bodies`` the MSG bodies found in ``data`` from ``pos``,\n"
             "for ``lengths[len(bodies):]``: each complete and followed by CRLF, or by a\n"
             "bare LF. Stops at the first that is not (incomplete, or a bad terminator,\n"
             "which the caller's Python loop then handles) and returns where.");

static PyObject *
take_bodies(PyObject *self, PyObject *args)
{
    PyObject *data, *lengths, *bodies;
    Py_ssize_t pos;
    if (!PyArg_ParseTuple(args, "O!nO!O!", &PyBytes_Type, &data, &pos, &PyList_Type, &lengths, &PyList_Type,
                          &bodies))
        return NULL;
    const char *d = PyBytes_AS_STRING(data);
    Py_ssize_t size = PyBytes_GET_SIZE(data);
    if (pos < 0 || pos > size) {
        PyErr_SetString(PyExc_ValueError, "pos out of range");
        return NULL;
    }
    for (Py_ssize_t i = PyList_GET_SIZE(bodies); i < PyList_GET_SIZE(lengths); i++) {
        Py_ssize_t n = PyLong_AsSsize_t(PyList_GET_ITEM(lengths, i));
        if (n < 0) {
            if (PyErr_Occurred())
                return NULL;
            break;
        }
        if (n > size - pos)
            break;
        Py_ssize_t end = pos + n, next;
        if (end + 1 < size && d[end] == '\r' && d[end + 1] == '\n')
            next = end + 2;
        else if (end < size && d[end] == '\n')
            next = end + 1;
        else
            break;
        PyObject *body = PyBytes_FromStringAndSize(d + pos, n);
        if (body == NULL || PyList_Append(bodies, body) < 0) {
            Py_XDECREF(body);
            return NULL;
        }
        Py_DECREF(body);
        pos = next;
    }
    return PyLong_FromSsize_t(pos);
}

/* --- crc32c (for tests) ---------------------------------------------------------- */

PyDoc_STRVAR(crc32c_doc, "crc32c(data) -> int\n\nCRC-32C of ``data`` as this module computes it.");

static PyObject *
crc32c(PyObject *self, PyObject *args)
{
    Py_buffer buf;
    if (!PyArg_ParseTuple(args, "y*", &buf))
        return NULL;
    int64_t crc = crc_of(buf.buf, buf.len);
    PyBuffer_Release(&buf);
    if (crc < 0)
        return NULL;
    return PyLong_FromUnsignedLong((unsigned long)crc);
}

PyDoc_STRVAR(crc32c_table_doc,
             "crc32c_table(data) -> int\n\nCRC-32C of ``data`` by the table loop, the one used where the CPU\n"
             "has no CRC instruction (so tests check it on machines that have one).");

static PyObject *
crc32c_table(PyObject *self, PyObject *args)
{
    Py_buffer buf;
    if (!PyArg_ParseTuple(args, "y*", &buf))
        return NULL;
    uint32_t crc = ~crc_soft(0xffffffffu, buf.buf, (size_t)buf.len);
    PyBuffer_Release(&buf);
    return PyLong_FromUnsignedLong(crc);
}

/* === record_rows (logd sink): READ records as (id, body) tuples ===================
 * Self-contained section: it only calls the helpers above (take_decimal,
 * crc_of, decimal_width, put_decimal, increment_decimal). */

PyDoc_STRVAR(record_rows_doc,
             "record_rows(data, pos, next_id, rows) -> end\n\n"
             "Check consecutive records in ``data`` from ``pos`` as verify_records does\n"
             "(canonical header, id in sequence from ``next_id``, CRLF, CRC) and append\n"
             "each passed record to the list ``rows`` as a tuple ``(id, body)``.\n"
             "Stops at the first record that is incomplete or fails a\n"
             "check, or at anything that is not a record, and returns where; the\n"
             "caller decides whether that is an error.");

/* The tuple (id, body), both references stolen. */
static PyObject *
new_row(PyObject *id, PyObject *body)
{
    PyObject *row = PyTuple_New(2);
    if (row == NULL) {
        Py_DECREF(id);
        Py_DECREF(body);
        return NULL;
    }
    PyTuple_SET_ITEM(row, 0, id);
    PyTuple_SET_ITEM(row, 1, body);
    /* An int and a bytes can be in no reference cycle: out of the collector's sight, a
     * batch of 10,000 rows costs no GC passes (they cost more than building the rows). */
    PyObject_GC_UnTrack(row);
    return row;
}

static PyObject *
record_rows(PyObject *self, PyObject *args)
{
    Py_buffer buf;
    Py_ssize_t pos;
    unsigned long long next_id;
    PyObject *rows;
    if (!PyArg_ParseTuple(args, "y*nKO!", &buf, &pos, &next_id, &PyList_Type, &rows))
        return NULL;
    if (pos < 0 || pos > buf.len) {
        PyBuffer_Release(&buf);
        PyErr_SetString(PyExc_ValueError, "pos out of range");
        return NULL;
    }
    const unsigned char *data = buf.buf;
    const unsigned char *end = data + buf.len;
    char idbuf[24];
    int id_width = decimal_width(next_id);
    put_decimal(idbuf, next_id, id_width);
    uint64_t id = next_id;
    const unsigned char *p = data + pos;
    while (end - p >= 2 && p[0] == '+' && p[1] >= '0' && p[1] <= '9') {
        const unsigned char *body, *after;
        uint64_t len;
        int taken = take_record(p, end, idbuf, id_width, &body, &len, &after);
        if (taken < 0)
            goto fail;
        if (taken == 0)
            break;
        PyObject *py_id = PyLong_FromUnsignedLongLong(id);
        if (py_id == NULL)
            goto fail;
        PyObject *py_body = PyBytes_FromStringAndSize((const char *)body, (Py_ssize_t)len);
        if (py_body == NULL) {
            Py_DECREF(py_id);
            goto fail;
        }
        PyObject *row = new_row(py_id, py_body);
        if (row == NULL)
            goto fail;
        int appended = PyList_Append(rows, row);
        Py_DECREF(row);
        if (appended < 0)
            goto fail;
        p = after + 2;
        id++;
        id_width = increment_decimal(idbuf, id_width);
    }
    Py_ssize_t stop = p - data;
    PyBuffer_Release(&buf);
    return PyLong_FromSsize_t(stop);
fail:
    PyBuffer_Release(&buf);
    return NULL;
}

/* === end of record_rows ============================================================ */

static PyMethodDef methods[] = {
    {"encode_batch", encode_batch, METH_VARARGS, encode_batch_doc},
    {"verify_records", verify_records, METH_VARARGS, verify_records_doc},
    {"rebase", rebase, METH_VARARGS, rebase_doc},
    {"msg_lengths", msg_lengths, METH_VARARGS, msg_lengths_doc},
    {"take_bodies", take_bodies, METH_VARARGS, take_bodies_doc},
    {"msg_commands", msg_commands, METH_VARARGS, msg_commands_doc},
    {"whole_msgs", (PyCFunction)(void (*)(void))whole_msgs, METH_FASTCALL, whole_msgs_doc},
    {"crc32c", crc32c, METH_VARARGS, crc32c_doc},
    {"crc32c_table", crc32c_table, METH_VARARGS, crc32c_table_doc},
    {"record_rows", record_rows, METH_VARARGS, record_rows_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "logd._hot",
    .m_doc = "The per-record loops of logd's hot paths, in C.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC
PyInit__hot(void)
{
    crc_init();
    PyObject *crc_module = PyImport_ImportModule("crc32c");
    if (crc_module == NULL)
        return NULL;
    py_crc32c = PyObject_GetAttrString(crc_module, "crc32c");
    Py_DECREF(crc_module);
    if (py_crc32c == NULL)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "hardware_crc", have_hw_crc) < 0 || lane_add_types(m) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}

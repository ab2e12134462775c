/*
 * poise.proxy.http._h1head: one call per HTTP/1.x message head.
 *
 * httptools (llhttp) calls Python back once per header; this parses a whole request
 * or response head that is complete in one buffer and hands it to Python as one
 * tuple.  It is a FAST PATH, not a second parser of record: it accepts only heads in
 * plain, common form, each of which llhttp also accepts with the same meaning, and
 * returns None for everything else — a head not complete in the buffer, any byte or
 * construct it does not know to be safe (obs-fold, bare LF, Transfer-Encoding,
 * Upgrade, an unusual Connection value, a duplicate Content-Length...).  The caller
 * then parses those bytes with httptools exactly as before, so every error answer
 * and every unusual case keeps llhttp's behaviour.  tests/proxy/test_h1head.py
 * checks the subset property against httptools with generated heads.
 *
 * parse_request(data: bytes, start: int) -> None or
 *     (method, target, http11, keep_alive, headers, body_start, content_length,
 *      header_block)
 * parse_response(data: bytes, start: int) -> None or
 *     (status, http11, keep_alive, headers, body_start, content_length)
 *
 * headers is a flat list [name, value, name, value, ...] with values' leading
 * whitespace removed and trailing whitespace kept (as llhttp reports them);
 * content_length is -1 without a Content-Length header; header_block is the size of
 * the header lines after the request line (without the final empty line).
 *
 * Changing it: edit this file and reinstall (`make install`); the interpreted
 * fallback (no C compiler, POISE_PURE=1 or POISE_INTERPRETED=1) does without it.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* Request-target bytes the fast path takes after the leading "/": visible ASCII
 * (llhttp takes the same in an origin-form target). */
#define TARGET_BYTE(c) ((c) > 0x20 && (c) < 0x7f)
/* Field-value bytes llhttp takes: HTAB, SP, visible ASCII, obs-text. */
#define VALUE_BYTE(c) ((c) == '\t' || ((c) >= 0x20 && (c) != 0x7f))

/* tchar (RFC 9110 §5.6.2): the bytes of a header name. */
static unsigned char tchar[256];

static void init_tchar(void)
{
    const char *extra = "!#$%&'*+-.^_`|~";
    for (int c = '0'; c <= '9'; c++) tchar[c] = 1;
    for (int c = 'a'; c <= 'z'; c++) tchar[c] = 1;
    for (int c = 'A'; c <= 'Z'; c++) tchar[c] = 1;
    for (const char *p = extra; *p; p++) tchar[(unsigned char)*p] = 1;
}

/* Methods the fast path takes, each returned as one shared bytes object. */
static const char *METHODS[] = {"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS",
                                "PATCH", NULL};
static PyObject *method_objects[8];

/* Case-insensitive comparison of b[0:n] with the lower-case ASCII word w. */
static int lower_equals(const unsigned char *b, Py_ssize_t n, const char *w)
{
    Py_ssize_t i = 0;
    for (; i < n && w[i]; i++) {
        if ((b[i] | 0x20) != (unsigned char)w[i]) return 0;
    }
    return i == n && w[i] == 0;
}

/* The first byte at or after p that is not a field-value byte (n if none).  Eight
 * bytes at a time while none of them is a control byte (below 0x20, or 0x7f), which
 * is what almost every value is; then byte by byte. */
static Py_ssize_t value_end(const unsigned char *b, Py_ssize_t p, Py_ssize_t n)
{
    const uint64_t ones = 0x0101010101010101ULL, highs = 0x8080808080808080ULL;
    while (n - p >= 8) {
        uint64_t x;
        memcpy(&x, b + p, 8);
        uint64_t below_space = (x - ones * 0x20) & ~x & highs;   /* a byte < 0x20 */
        uint64_t y = x ^ (ones * 0x7f);
        uint64_t del = (y - ones) & ~y & highs;                 /* a byte == 0x7f */
        if (below_space | del) break;
        p += 8;
    }
    while (p < n && VALUE_BYTE(b[p])) p++;
    return p;
}

/* What the header loop learned besides the list. */
typedef struct {
    Py_ssize_t content_length;  /* -1: none */
    int close;                  /* Connection: close */
    int keep_alive;             /* Connection: keep-alive */
    int connection_seen;
} HeadFacts;

enum { OK = 0, DECLINE = 1, ERROR = -1 };

/* Parse header lines from p until the empty line; append names and values to
 * headers.  *end gets the offset just past the empty line. */
static int parse_fields(const unsigned char *b, Py_ssize_t p, Py_ssize_t n,
                        PyObject *headers, HeadFacts *facts, Py_ssize_t *end)
{
    for (;;) {
        if (p >= n) return DECLINE;
        if (b[p] == '\r') {
            if (p + 1 >= n || b[p + 1] != '\n') return DECLINE;
            *end = p + 2;
            return OK;
        }
        Py_ssize_t name_start = p;
        while (p < n && tchar[b[p]]) p++;
        if (p >= n || b[p] != ':' || p == name_start) return DECLINE;
        Py_ssize_t name_len = p - name_start;
        p++;
        while (p < n && (b[p] == ' ' || b[p] == '\t')) p++;
        Py_ssize_t value_start = p;
        p = value_end(b, p, n);
        if (p + 1 >= n || b[p] != '\r' || b[p + 1] != '\n') return DECLINE;
        Py_ssize_t value_len = p - value_start;
        p += 2;

        const unsigned char *name = b + name_start, *value = b + value_start;
        switch (name_len) {
        case 14:
            if (lower_equals(name, 14, "content-length")) {
                if (facts->content_length >= 0 || value_len < 1 || value_len > 15)
                    return DECLINE;
                Py_ssize_t length = 0;
                for (Py_ssize_t i = 0; i < value_len; i++) {
                    if (value[i] < '0' || value[i] > '9') return DECLINE;
                    length = length * 10 + (value[i] - '0');
                }
                facts->content_length = length;
            }
            break;
        case 17:
            if (lower_equals(name, 17, "transfer-encoding")) return DECLINE;
            break;
        case 7:
            if (lower_equals(name, 7, "upgrade")) return DECLINE;
            break;
        case 10:
            if (lower_equals(name, 10, "connection")) {
                if (facts->connection_seen) return DECLINE;
                facts->connection_seen = 1;
                if (lower_equals(value, value_len, "close")) facts->close = 1;
                else if (lower_equals(value, value_len, "keep-alive")) facts->keep_alive = 1;
                else return DECLINE;
            }
            break;
        }
        PyObject *name_obj = PyBytes_FromStringAndSize((const char *)name, name_len);
        if (name_obj == NULL) return ERROR;
        int failed = PyList_Append(headers, name_obj);
        Py_DECREF(name_obj);
        if (failed) return ERROR;
        PyObject *value_obj = PyBytes_FromStringAndSize((const char *)value, value_len);
        if (value_obj == NULL) return ERROR;
        failed = PyList_Append(headers, value_obj);
        Py_DECREF(value_obj);
        if (failed) return ERROR;
    }
}

/* The header lines from p as a new list.  NULL with *declined set when the fast path
 * declines them, NULL alone on a Python error. */
static PyObject *read_fields(const unsigned char *b, Py_ssize_t p, Py_ssize_t n,
                             HeadFacts *facts, Py_ssize_t *end, int *declined)
{
    PyObject *headers = PyList_New(0);
    if (headers == NULL) return NULL;
    int status = parse_fields(b, p, n, headers, facts, end);
    if (status == OK) return headers;
    Py_DECREF(headers);
    *declined = status == DECLINE;
    return NULL;
}

/* "HTTP/1.0" or "HTTP/1.1" at b[p:]: 1 for 1.1, 0 for 1.0, -1 otherwise. */
static int http_version(const unsigned char *b, Py_ssize_t p, Py_ssize_t n)
{
    if (n - p < 8 || memcmp(b + p, "HTTP/1.", 7) != 0) return -1;
    if (b[p + 7] == '1') return 1;
    if (b[p + 7] == '0') return 0;
    return -1;
}

/* A tuple of the n new references in items (all consumed, also on failure). */
static PyObject *new_tuple(PyObject **items, int n)
{
    PyObject *tuple = PyTuple_New(n);
    for (int i = 0; i < n; i++) {
        if (tuple == NULL || items[i] == NULL) {
            Py_XDECREF(items[i]);
            continue;
        }
        PyTuple_SET_ITEM(tuple, i, items[i]);
        items[i] = NULL;
    }
    for (int i = 0; i < n; i++) {
        if (tuple != NULL && PyTuple_GET_ITEM(tuple, i) == NULL) {
            Py_DECREF(tuple);       /* an item failed: the rest are released with it */
            return NULL;
        }
    }
    return tuple;
}

static int parse_args(PyObject *const *args, Py_ssize_t nargs, const unsigned char **b,
                      Py_ssize_t *n, Py_ssize_t *start)
{
    if (nargs != 2 || !PyBytes_CheckExact(args[0]) || !PyLong_CheckExact(args[1])) {
        PyErr_SetString(PyExc_TypeError, "expected (bytes, int)");
        return -1;
    }
    *b = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    *n = PyBytes_GET_SIZE(args[0]);
    *start = PyLong_AsSsize_t(args[1]);
    if (*start == -1 && PyErr_Occurred()) return -1;
    if (*start < 0 || *start > *n) {
        PyErr_SetString(PyExc_ValueError, "start out of range");
        return -1;
    }
    return 0;
}

static PyObject *parse_request(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    const unsigned char *b;
    Py_ssize_t n, p;
    if (parse_args(args, nargs, &b, &n, &p) < 0) return NULL;

    PyObject *method = NULL;
    for (int i = 0; METHODS[i]; i++) {
        Py_ssize_t len = (Py_ssize_t)strlen(METHODS[i]);
        if (n - p > len && memcmp(b + p, METHODS[i], len) == 0 && b[p + len] == ' ') {
            method = method_objects[i];
            p += len + 1;
            break;
        }
    }
    if (method == NULL) Py_RETURN_NONE;
    /* Origin-form only: llhttp checks the syntax of absolute-form and "*" itself. */
    if (p >= n || b[p] != '/') Py_RETURN_NONE;
    Py_ssize_t target_start = p;
    while (p < n && TARGET_BYTE(b[p])) p++;
    Py_ssize_t target_len = p - target_start;
    if (target_len == 0 || p >= n || b[p] != ' ') Py_RETURN_NONE;
    int http11 = http_version(b, p + 1, n);
    p += 9;
    if (http11 < 0 || p + 1 >= n || b[p] != '\r' || b[p + 1] != '\n') Py_RETURN_NONE;
    p += 2;
    Py_ssize_t fields_start = p;

    HeadFacts facts = {-1, 0, 0, 0};
    Py_ssize_t end;
    int declined = 0;
    PyObject *headers = read_fields(b, p, n, &facts, &end, &declined);
    if (headers == NULL) {
        if (declined) Py_RETURN_NONE;
        return NULL;
    }
    PyObject *target = PyBytes_FromStringAndSize((const char *)b + target_start, target_len);
    if (target == NULL) {
        Py_DECREF(headers);
        return NULL;
    }
    int keep_alive = http11 ? !facts.close : facts.keep_alive;
    Py_INCREF(method);
    PyObject *items[8] = {method, target, PyBool_FromLong(http11),
                          PyBool_FromLong(keep_alive), headers, PyLong_FromSsize_t(end),
                          PyLong_FromSsize_t(facts.content_length),
                          PyLong_FromSsize_t(end - 2 - fields_start)};
    return new_tuple(items, 8);
}

static PyObject *parse_response(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    const unsigned char *b;
    Py_ssize_t n, p;
    if (parse_args(args, nargs, &b, &n, &p) < 0) return NULL;

    int http11 = http_version(b, p, n);
    p += 8;
    /* " DDD " with a final status (2xx-5xx); informational ones go the slow way. */
    if (http11 < 0 || n - p < 5 || b[p] != ' ' || b[p + 4] != ' ') Py_RETURN_NONE;
    int code = 0;
    for (int i = 1; i <= 3; i++) {
        unsigned char c = b[p + i];
        if (c < '0' || c > '9') Py_RETURN_NONE;
        code = code * 10 + (c - '0');
    }
    if (code < 200 || code > 599) Py_RETURN_NONE;
    p += 5;
    while (p < n && VALUE_BYTE(b[p])) p++;           /* the reason phrase */
    if (p + 1 >= n || b[p] != '\r' || b[p + 1] != '\n') Py_RETURN_NONE;
    p += 2;

    HeadFacts facts = {-1, 0, 0, 0};
    Py_ssize_t end;
    int declined = 0;
    PyObject *headers = read_fields(b, p, n, &facts, &end, &declined);
    if (headers == NULL) {
        if (declined) Py_RETURN_NONE;
        return NULL;
    }
    int keep_alive = http11 ? !facts.close : facts.keep_alive;
    PyObject *items[6] = {PyLong_FromLong(code), PyBool_FromLong(http11),
                          PyBool_FromLong(keep_alive), headers, PyLong_FromSsize_t(end),
                          PyLong_FromSsize_t(facts.content_length)};
    return new_tuple(items, 6);
}

static PyMethodDef methods[] = {
    {"parse_request", (PyCFunction)(void (*)(void))parse_request, METH_FASTCALL,
     "parse_request(data, start): a complete plain request head at data[start:] as "
     "(method, target, http11, keep_alive, headers, body_start, content_length, "
     "header_block), else None."},
    {"parse_response", (PyCFunction)(void (*)(void))parse_response, METH_FASTCALL,
     "parse_response(data, start): a complete plain final response head at "
     "data[start:] as (status, http11, keep_alive, headers, body_start, "
     "content_length), else None."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_h1head",
    "One-call HTTP/1.x head parsing for the common case (see h1head.c).", -1, methods,
};

PyMODINIT_FUNC PyInit__h1head(void)
{
    init_tchar();
    for (int i = 0; METHODS[i]; i++) {
        method_objects[i] = PyBytes_FromString(METHODS[i]);
        if (method_objects[i] == NULL) return NULL;
    }
    return PyModule_Create(&module);
}

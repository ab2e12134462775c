/*
 * poise.proxy.http._h1head: one call per HTTP/1.x message head.
 *
 * httptools (llhttp) calls Python back once per header; this parses a whole request
 * or response head that is complete in one buffer and hands it to Python as one
 * tuple.  It is a FAST PATH, not a second parser of record: it accepts only heads in
 * plain, common form, each of which llhttp also accepts with the same meaning, and
 * returns None for everything else — a head not complete in the buffer, any byte or
 * construct it does not know to be safe (obs-fold, bare LF, Transfer-Encoding,
 * Upgrade, Proxy-Connection, an unusual Connection value, a duplicate
 * Content-Length...).  The caller
 * then parses those bytes with httptools exactly as before, so every error answer
 * and every unusual case keeps llhttp's behaviour.  tests/proxy/test_h1head.py
 * checks the subset property against httptools with generated heads.
 *
 * parse_request(data: bytes, start: int) -> None or
 *     (method, target, http11, keep_alive, fields, watched, body_start,
 *      content_length, header_block, host, expect_continue, field_count)
 * parse_response(data: bytes, start: int) -> None or
 *     (status, http11, keep_alive, block, body_start, content_length)
 * clock() -> float
 *     CLOCK_MONOTONIC in seconds: time.monotonic()'s clock, read cheaper
 * join_parts(*parts: bytes | list[bytes]) -> bytes
 *     b"".join of the parts flattened, in one allocation (building a request head
 *     from its pieces and the field list without joining the list first)
 *
 * It also sorts the header fields the way the Python path does (request.py's
 * RequestHead.add_watched, upstream.py's UpstreamConnection.on_header), so that
 * Python touches only the fields that need a look:
 * - a request's fields are RequestHead.fields ready-made: flat name, ": ", value,
 *   CRLF groups in order, without hop-by-hop fields, X-Forwarded-* or an Expect other
 *   than 100-continue; watched holds its Connection and X-Forwarded-For fields as flat
 *   name, value pairs for add_watched (None when it has neither); host is the Host
 *   value or None (a second Host is declined: Python answers it);
 * - a response's block is its end-to-end header lines as one bytes object, "name:
 *   value\r\n" each, hop-by-hop ones left out.
 * Values have their leading whitespace removed and trailing whitespace kept (as
 * llhttp reports them); content_length is -1 without a Content-Length header;
 * header_block is the size of the header lines after the request line (without the
 * final empty line); field_count counts every header line.
 *
 * Changing it: edit this file and reinstall (`make install`); the interpreted
 * fallback (no C compiler, POISE_PURE=1 or POISE_INTERPRETED=1) does without it.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#ifdef __SSE2__
#include <emmintrin.h>
#endif

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
static Py_ssize_t method_lengths[8];

/* Eight-byte words, read from unaligned bytes, with the first byte lowest: the word
 * tricks below find "the first byte that..." with a count of trailing zero bits. */
#if defined(__GNUC__) && defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define WORD_SCAN 1
#else
#define WORD_SCAN 0
#endif
#define ONES 0x0101010101010101ULL
#define HIGHS 0x8080808080808080ULL

/* The first byte at or after p that is not a field-value byte (n if none).  Eight
 * bytes at a time: a word's high bits mark its bytes below 0x20 and its 0x7f bytes;
 * the lowest marked byte is exactly the first such byte (the subtraction's borrows only
 * run upwards from it): the answer, unless it is an HTAB (a value byte below 0x20),
 * after which the scan goes on.  Then byte by byte for the last few bytes of the
 * buffer. */
static Py_ssize_t value_end(const unsigned char *b, Py_ssize_t p, Py_ssize_t n)
{
#ifdef __SSE2__
    /* Sixteen bytes at a time first: a byte below 0x20 (unsigned: max(x, 0x20) != x)
     * or equal to 0x7f ends the value, unless it is an HTAB. */
    const __m128i space = _mm_set1_epi8(0x20), del = _mm_set1_epi8(0x7f);
    while (n - p >= 16) {
        __m128i x = _mm_loadu_si128((const __m128i *)(b + p));
        __m128i plain = _mm_cmpeq_epi8(_mm_max_epu8(x, space), x);     /* x >= 0x20 */
        __m128i stop = _mm_or_si128(_mm_andnot_si128(plain, _mm_set1_epi8(-1)),
                                    _mm_cmpeq_epi8(x, del));
        unsigned mask = (unsigned)_mm_movemask_epi8(stop);
        if (mask) {
            p += __builtin_ctz(mask);
            if (b[p] != '\t') return p;
            p++;                /* (HTAB is a value byte: go on after it) */
            continue;
        }
        p += 16;
    }
#endif
    while (n - p >= 8) {
        uint64_t x;
        memcpy(&x, b + p, 8);
        uint64_t below_space = (x - ONES * 0x20) & ~x & HIGHS;   /* a byte < 0x20 */
        uint64_t y = x ^ (ONES * 0x7f);
        uint64_t del = (y - ONES) & ~y & HIGHS;                 /* a byte == 0x7f */
        if (below_space | del) {
#if WORD_SCAN
            p += __builtin_ctzll(below_space | del) >> 3;
            if (b[p] != '\t') return p;
            p++;                /* (HTAB is a value byte: go on after it) */
            continue;
#else
            break;
#endif
        }
        p += 8;
    }
    while (p < n && VALUE_BYTE(b[p])) p++;
    return p;
}

/* b[0:n] (tchar or field-value bytes) equal, ignoring case, to the lower-case ASCII
 * word w (letters, digits and '-').  OR-ing 0x20 into a byte lower-cases a letter and
 * leaves '-' and digits as they are; the only other bytes that become a letter, a
 * digit or '-' are control bytes, which neither a name nor a value holds, so the
 * comparison is exact.  Eight bytes at a time from 8 bytes on. */
static int lower_equals_n(const unsigned char *b, Py_ssize_t n, const char *w, size_t wn)
{
    if ((size_t)n != wn) return 0;
    if (n < 8) {
        for (Py_ssize_t i = 0; i < n; i++) {
            if ((b[i] | 0x20) != (unsigned char)w[i]) return 0;
        }
        return 1;
    }
    const uint64_t lower = ONES * 0x20;
    uint64_t x, y;
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8) {
        memcpy(&x, b + i, 8);
        memcpy(&y, w + i, 8);
        if ((x | lower) != y) return 0;
    }
    if (i == n) return 1;
    memcpy(&x, b + n - 8, 8);         /* the last 8 bytes, overlapping those compared */
    memcpy(&y, w + n - 8, 8);
    return (x | lower) == y;
}

/* lower_equals(b, n, "word"): the word a string literal (its length known here). */
#define lower_equals(b, n, w) lower_equals_n((b), (n), (w), sizeof(w) - 1)

/* Copy n bytes to out and return the end: fixed-size moves up to 16 bytes (most
 * pieces of a head: ": ", CRLF, names, short values), where a call to memcpy would
 * cost more than the copy. */
static inline char *put(char *out, const char *src, Py_ssize_t n)
{
    if (n > 16) {
        memcpy(out, src, (size_t)n);
    } else if (n >= 8) {            /* two 8-byte moves, overlapping when n < 16 */
        uint64_t head, tail;
        memcpy(&head, src, 8);
        memcpy(&tail, src + n - 8, 8);
        memcpy(out, &head, 8);
        memcpy(out + n - 8, &tail, 8);
    } else if (n >= 4) {
        uint32_t head, tail;
        memcpy(&head, src, 4);
        memcpy(&tail, src + n - 4, 4);
        memcpy(out, &head, 4);
        memcpy(out + n - 4, &tail, 4);
    } else if (n > 0) {             /* 1 to 3 bytes: first, middle and last */
        out[0] = src[0];
        out[n >> 1] = src[n >> 1];
        out[n - 1] = src[n - 1];
    }
    return out + n;
}

/* The first byte at or after p that is not a tchar (n if none): sixteen bytes at a
 * time while they are letters, digits or '-' (what header names are made of), then
 * byte by byte. */
static Py_ssize_t name_end(const unsigned char *b, Py_ssize_t p, Py_ssize_t n)
{
#ifdef __SSE2__
    const __m128i fold = _mm_set1_epi8(0x20), dash = _mm_set1_epi8('-');
    const __m128i before_a = _mm_set1_epi8(0x60), after_z = _mm_set1_epi8(0x7b);
    const __m128i before_0 = _mm_set1_epi8(0x2f), after_9 = _mm_set1_epi8(0x3a);
    while (n - p >= 16) {
        __m128i x = _mm_loadu_si128((const __m128i *)(b + p));
        __m128i low = _mm_or_si128(x, fold);    /* (bytes >= 0x80 are negative: no match) */
        __m128i letter = _mm_and_si128(_mm_cmpgt_epi8(low, before_a),
                                       _mm_cmplt_epi8(low, after_z));
        __m128i digit = _mm_and_si128(_mm_cmpgt_epi8(x, before_0), _mm_cmplt_epi8(x, after_9));
        __m128i plain = _mm_or_si128(_mm_or_si128(letter, digit), _mm_cmpeq_epi8(x, dash));
        unsigned mask = (unsigned)_mm_movemask_epi8(plain);
        if (mask != 0xffff) {
            p += __builtin_ctz(~mask);
            break;
        }
        p += 16;
    }
#endif
    while (p < n && tchar[b[p]]) p++;
    return p;
}

/* What a header name means to the proxy (request.py's _SPECIAL, headers.py's
 * HOP_BY_HOP): FORWARD as it is, or a name that needs a look. */
enum {
    K_FORWARD, K_CONTENT_LENGTH, K_HOST, K_CONNECTION, K_EXPECT, K_XFF,
    K_XF_OTHER,     /* X-Forwarded-Proto/-Host: a request's are dropped (poise sets
                       its own) */
    K_DROP,         /* hop-by-hop: dropped */
    K_DECLINE,      /* Transfer-Encoding, Upgrade, Proxy-Connection: the slow path */
};

static int kind_of(const unsigned char *name, Py_ssize_t len)
{
    switch (len) {
    case 2: if (lower_equals(name, 2, "te")) return K_DROP; break;
    case 4: if (lower_equals(name, 4, "host")) return K_HOST; break;
    case 6: if (lower_equals(name, 6, "expect")) return K_EXPECT; break;
    case 7:
        if (lower_equals(name, 7, "trailer")) return K_DROP;
        if (lower_equals(name, 7, "upgrade")) return K_DECLINE;
        break;
    case 10:
        if (lower_equals(name, 10, "connection")) return K_CONNECTION;
        if (lower_equals(name, 10, "keep-alive")) return K_DROP;
        break;
    case 14: if (lower_equals(name, 14, "content-length")) return K_CONTENT_LENGTH; break;
    case 15: if (lower_equals(name, 15, "x-forwarded-for")) return K_XFF; break;
    case 16:
        /* llhttp reads it like Connection: declined, as a second Connection is */
        if (lower_equals(name, 16, "proxy-connection")) return K_DECLINE;
        if (lower_equals(name, 16, "x-forwarded-host")) return K_XF_OTHER;
        break;
    case 17:
        if (lower_equals(name, 17, "transfer-encoding")) return K_DECLINE;
        if (lower_equals(name, 17, "x-forwarded-proto")) return K_XF_OTHER;
        break;
    case 18: if (lower_equals(name, 18, "proxy-authenticate")) return K_DROP; break;
    case 19: if (lower_equals(name, 19, "proxy-authorization")) return K_DROP; break;
    }
    return K_FORWARD;
}

/* One header line: where its name and value are in the buffer, and its kind. */
typedef struct {
    Py_ssize_t name, name_len, value, value_len;
    int kind;
} Field;

/* More fields than this in one head: the slow path (whose limit check answers). */
#define MAX_FIELDS 128

/* One head's header lines and what the header loop learned from them. */
typedef struct {
    Py_ssize_t content_length;  /* -1: none */
    int close;                  /* Connection: close */
    int keep_alive;             /* Connection: keep-alive */
    int connection_seen;
    int host;                   /* the Host field's index, -1: none */
    int expect_continue;        /* an "Expect: 100-continue" (request) */
    int count;
    Field fields[MAX_FIELDS];
} Head;

enum { OK = 0, DECLINE = 1 };

/* Value bytes equal, ignoring case and trailing SP/HTAB, to the lower-case word w. */
static int value_is_n(const unsigned char *v, Py_ssize_t n, const char *w, size_t wn)
{
    while (n > 0 && (v[n - 1] == ' ' || v[n - 1] == '\t')) n--;
    return lower_equals_n(v, n, w, wn);
}

#define value_is(v, n, w) value_is_n((v), (n), (w), sizeof(w) - 1)

/* Parse the header lines from p up to the empty line into head; *end gets the
 * offset just past the empty line.  No Python objects: DECLINE or OK. */
static int parse_fields(const unsigned char *b, Py_ssize_t p, Py_ssize_t n, Head *head,
                        int request, Py_ssize_t *end)
{
    for (;;) {
        if (p >= n) return DECLINE;
        if (b[p] == '\r') {
            if (p + 1 >= n || b[p + 1] != '\n') return DECLINE;
            *end = p + 2;
            return OK;
        }
        if (head->count == MAX_FIELDS) return DECLINE;
        Py_ssize_t name_start = p;
        p = name_end(b, p, n);
        if (p >= n || b[p] != ':' || p == name_start) return DECLINE;
        Py_ssize_t name_len = p - name_start;
        p++;
        if (p < n && b[p] == ' ') p++;     /* (the usual one space) */
        while (p < n && (b[p] == ' ' || b[p] == '\t')) p++;
        Py_ssize_t value_start = p;
        p = value_end(b, p, n);
        if (p + 1 >= n || b[p] != '\r' || b[p + 1] != '\n') return DECLINE;
        Py_ssize_t value_len = p - value_start;
        p += 2;

        const unsigned char *value = b + value_start;
        int kind = kind_of(b + name_start, name_len);
        if (!request && kind < K_DROP && kind != K_CONTENT_LENGTH && kind != K_CONNECTION)
            kind = K_FORWARD;       /* a response's Host, Expect, X-Forwarded-*: as is */
        switch (kind) {
        case K_DECLINE:
            return DECLINE;
        case K_CONTENT_LENGTH: {
            if (head->content_length >= 0 || value_len < 1 || value_len > 15)
                return DECLINE;
            Py_ssize_t length = 0;
            for (Py_ssize_t i = 0; i < value_len; i++) {
                if (value[i] < '0' || value[i] > '9') return DECLINE;
                length = length * 10 + (value[i] - '0');
            }
            head->content_length = length;
            break;
        }
        case K_CONNECTION:
            if (head->connection_seen) return DECLINE;
            head->connection_seen = 1;
            if (lower_equals(value, value_len, "close")) head->close = 1;
            else if (lower_equals(value, value_len, "keep-alive")) head->keep_alive = 1;
            else return DECLINE;
            break;
        case K_HOST:
            if (head->host >= 0) return DECLINE;    /* (RequestHead answers 400) */
            head->host = head->count;
            break;
        case K_EXPECT:
            /* Forwarded only as 100-continue (RequestHead.add_watched). */
            if (value_is(value, value_len, "100-continue")) head->expect_continue = 1;
            else kind = K_DROP;
            break;
        }
        Field *f = &head->fields[head->count++];
        f->name = name_start;
        f->name_len = name_len;
        f->value = value_start;
        f->value_len = value_len;
        f->kind = kind;
    }
}

/* "HTTP/1.0" or "HTTP/1.1" at b[p:]: 1 for 1.1, 0 for 1.0, -1 otherwise. */
static int http_version(const unsigned char *b, Py_ssize_t p, Py_ssize_t n)
{
    if (n - p < 8 || memcmp(b + p, "HTTP/1.", 7) != 0) return -1;
    if (b[p + 7] == '1') return 1;
    if (b[p + 7] == '0') return 0;
    return -1;
}

/* A tuple of the n new references in items (all consumed, also on failure).
 *
 * *kept is the tuple this function returned last time, kept for reuse: when nobody
 * else holds it any more (its reference count is 1, ours), its items are replaced
 * instead of a new tuple being made and the old one freed, as CPython's zip() and
 * dict iterators reuse their result tuple.  A parse's tuple is unpacked and dropped
 * by its caller at once, so this is the usual case; a caller that keeps one gets a
 * new tuple next time (and the kept one is let go). */
static PyObject *new_tuple(PyObject **items, int n, PyObject **kept)
{
    for (int i = 0; i < n; i++) {
        if (items[i] == NULL) goto error;
    }
    PyObject *tuple = *kept;
    if (tuple != NULL && Py_REFCNT(tuple) == 1) {
        for (int i = 0; i < n; i++) {
            PyObject *old = PyTuple_GET_ITEM(tuple, i);
            PyTuple_SET_ITEM(tuple, i, items[i]);
            Py_DECREF(old);
        }
        /* (The collector untracks a tuple of atomic items; this one may now hold a
         * list.) */
        if (!PyObject_GC_IsTracked(tuple)) PyObject_GC_Track(tuple);
        Py_INCREF(tuple);
        return tuple;
    }
    tuple = PyTuple_New(n);
    if (tuple == NULL) goto error;
    for (int i = 0; i < n; i++) PyTuple_SET_ITEM(tuple, i, items[i]);
    Py_INCREF(tuple);
    Py_XSETREF(*kept, tuple);
    return tuple;
error:
    for (int i = 0; i < n; i++) Py_XDECREF(items[i]);
    return NULL;
}

/* The tuples parse_request and parse_response returned last (see new_tuple). */
static PyObject *request_kept, *response_kept;

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

static void init_head(Head *head)
{
    head->content_length = -1;
    head->close = head->keep_alive = head->connection_seen = 0;
    head->host = -1;
    head->expect_continue = 0;
    head->count = 0;
}

static PyObject *colon_space, *crlf;     /* b": ", b"\r\n": shared by every field */

/* A request's forwarded fields as RequestHead.fields holds them (flat name, ": ",
 * value, CRLF groups, in order), and the Connection and X-Forwarded-For fields as
 * flat name, value pairs for RequestHead.add_watched (None if there are none);
 * *host_out gets the Host field's value object (a new reference), if the head has
 * one. */
static int request_lists(const unsigned char *b, const Head *head, PyObject **fields_out,
                         PyObject **watched_out, PyObject **host_out)
{
    Py_ssize_t forwarded = 0, watched = 0;
    for (int i = 0; i < head->count; i++) {
        int kind = head->fields[i].kind;
        if (kind == K_CONNECTION || kind == K_XFF) watched++;
        else if (kind != K_DROP && kind != K_XF_OTHER) forwarded++;
    }
    /* (No watched field, the usual case: None rather than an empty list.) */
    PyObject *fields = PyList_New(4 * forwarded), *pairs = NULL;
    if (watched) pairs = PyList_New(2 * watched);
    else {
        pairs = Py_None;
        Py_INCREF(pairs);
    }
    if (fields == NULL || pairs == NULL) goto error;
    Py_ssize_t at = 0, pair_at = 0;
    for (int i = 0; i < head->count; i++) {
        const Field *f = &head->fields[i];
        if (f->kind == K_DROP || f->kind == K_XF_OTHER) continue;
        PyObject *name = PyBytes_FromStringAndSize((const char *)b + f->name, f->name_len);
        PyObject *value = PyBytes_FromStringAndSize((const char *)b + f->value, f->value_len);
        if (name == NULL || value == NULL) {
            Py_XDECREF(name);
            Py_XDECREF(value);
            goto error;
        }
        if (i == head->host) {      /* (the Host value: the same object) */
            Py_INCREF(value);
            *host_out = value;
        }
        if (f->kind == K_CONNECTION || f->kind == K_XFF) {
            PyList_SET_ITEM(pairs, pair_at, name);
            PyList_SET_ITEM(pairs, pair_at + 1, value);
            pair_at += 2;
            continue;
        }
        Py_INCREF(colon_space);
        Py_INCREF(crlf);
        PyList_SET_ITEM(fields, at, name);
        PyList_SET_ITEM(fields, at + 1, colon_space);
        PyList_SET_ITEM(fields, at + 2, value);
        PyList_SET_ITEM(fields, at + 3, crlf);
        at += 4;
    }
    *fields_out = fields;
    *watched_out = pairs;
    return 0;
error:
    Py_XDECREF(fields);         /* (unfilled items are NULL: list_dealloc skips them) */
    Py_XDECREF(pairs);
    return -1;
}

/* A response's end-to-end header lines as one bytes object ("name: value\r\n" each,
 * hop-by-hop ones left out), as UpstreamConnection.on_header would build them. */
static PyObject *response_block(const unsigned char *b, const Head *head)
{
    Py_ssize_t size = 0;
    for (int i = 0; i < head->count; i++) {
        const Field *f = &head->fields[i];
        if (f->kind != K_DROP && f->kind != K_CONNECTION)
            size += f->name_len + f->value_len + 4;
    }
    PyObject *block = PyBytes_FromStringAndSize(NULL, size);
    if (block == NULL) return NULL;
    char *out = PyBytes_AS_STRING(block);
    for (int i = 0; i < head->count; i++) {
        const Field *f = &head->fields[i];
        if (f->kind == K_DROP || f->kind == K_CONNECTION) continue;
        out = put(out, (const char *)b + f->name, f->name_len);
        *out++ = ':';
        *out++ = ' ';
        out = put(out, (const char *)b + f->value, f->value_len);
        *out++ = '\r';
        *out++ = '\n';
    }
    return block;
}

static PyObject *parse_request(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    const unsigned char *b;
    Py_ssize_t n, p;
    if (parse_args(args, nargs, &b, &n, &p) < 0) return NULL;

    PyObject *method = NULL;
    for (int i = 0; METHODS[i]; i++) {
        Py_ssize_t len = method_lengths[i];
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

    Head head;
    init_head(&head);
    Py_ssize_t end;
    if (parse_fields(b, p, n, &head, 1, &end) != OK) Py_RETURN_NONE;
    PyObject *fields, *watched, *host = NULL;
    if (request_lists(b, &head, &fields, &watched, &host) < 0) {
        Py_XDECREF(host);       /* (set if the failure came after the Host field) */
        return NULL;
    }
    if (host == NULL) {
        host = Py_None;
        Py_INCREF(host);
    }
    int keep_alive = http11 ? !head.close : head.keep_alive;
    Py_INCREF(method);
    PyObject *items[12] = {
        method, PyBytes_FromStringAndSize((const char *)b + target_start, target_len),
        PyBool_FromLong(http11), PyBool_FromLong(keep_alive), fields, watched,
        PyLong_FromSsize_t(end), PyLong_FromSsize_t(head.content_length),
        PyLong_FromSsize_t(end - 2 - fields_start), host,
        PyBool_FromLong(head.expect_continue), PyLong_FromLong(head.count)};
    return new_tuple(items, 12, &request_kept);
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

    Head head;
    init_head(&head);
    Py_ssize_t end;
    if (parse_fields(b, p, n, &head, 0, &end) != OK) Py_RETURN_NONE;
    int keep_alive = http11 ? !head.close : head.keep_alive;
    PyObject *items[6] = {PyLong_FromLong(code), PyBool_FromLong(http11),
                          PyBool_FromLong(keep_alive), response_block(b, &head),
                          PyLong_FromSsize_t(end),
                          PyLong_FromSsize_t(head.content_length)};
    return new_tuple(items, 6, &response_kept);
}

/* join_parts(*parts): the parts in order as one bytes object, each part a bytes
 * object or a list of bytes objects (b"".join over them, flattened, without the
 * intermediate objects). */
static PyObject *join_parts(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t size = 0;
    for (Py_ssize_t i = 0; i < nargs; i++) {
        PyObject *part = args[i];
        if (PyBytes_CheckExact(part)) {
            size += PyBytes_GET_SIZE(part);
            continue;
        }
        if (!PyList_CheckExact(part)) goto type_error;
        for (Py_ssize_t j = 0; j < PyList_GET_SIZE(part); j++) {
            PyObject *item = PyList_GET_ITEM(part, j);
            if (!PyBytes_CheckExact(item)) goto type_error;
            size += PyBytes_GET_SIZE(item);
        }
    }
    if (size < 0) {     /* (wrapped around: not from parts that fit in memory) */
        PyErr_SetString(PyExc_OverflowError, "join_parts: result too large");
        return NULL;
    }
    PyObject *joined = PyBytes_FromStringAndSize(NULL, size);
    if (joined == NULL) return NULL;
    char *out = PyBytes_AS_STRING(joined);
    for (Py_ssize_t i = 0; i < nargs; i++) {
        PyObject *part = args[i];
        if (PyBytes_CheckExact(part)) {
            out = put(out, PyBytes_AS_STRING(part), PyBytes_GET_SIZE(part));
            continue;
        }
        for (Py_ssize_t j = 0; j < PyList_GET_SIZE(part); j++) {
            PyObject *item = PyList_GET_ITEM(part, j);
            out = put(out, PyBytes_AS_STRING(item), PyBytes_GET_SIZE(item));
        }
    }
    return joined;
type_error:
    PyErr_SetString(PyExc_TypeError, "join_parts: each part must be bytes or a list of bytes");
    return NULL;
}

/* clock(): CLOCK_MONOTONIC in seconds, as time.monotonic() (and uvloop's and
 * asyncio's loop.time()) read it, for less: no call through the time module's
 * checks, one float. */
static PyObject *clock_now(PyObject *self, PyObject *unused)
{
    struct timespec ts;
    if (clock_gettime(CLOCK_MONOTONIC, &ts) != 0) return PyErr_SetFromErrno(PyExc_OSError);
    return PyFloat_FromDouble((double)ts.tv_sec + (double)ts.tv_nsec * 1e-9);
}

static PyMethodDef methods[] = {
    {"parse_request", (PyCFunction)(void (*)(void))parse_request, METH_FASTCALL,
     "parse_request(data, start): a complete plain request head at data[start:] as "
     "(method, target, http11, keep_alive, fields, watched, body_start, "
     "content_length, header_block, host, expect_continue, field_count), else None."},
    {"parse_response", (PyCFunction)(void (*)(void))parse_response, METH_FASTCALL,
     "parse_response(data, start): a complete plain final response head at "
     "data[start:] as (status, http11, keep_alive, block, body_start, "
     "content_length), else None."},
    {"join_parts", (PyCFunction)(void (*)(void))join_parts, METH_FASTCALL,
     "join_parts(*parts): the parts (bytes, or lists of bytes) joined in order."},
    {"clock", clock_now, METH_NOARGS,
     "clock(): the monotonic clock in seconds (time.monotonic's clock)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_h1head",
    "One-call HTTP/1.x head parsing for the common case (see h1head.c).", -1, methods,
};

PyMODINIT_FUNC PyInit__h1head(void)
{
    init_tchar();
    colon_space = PyBytes_FromString(": ");
    crlf = PyBytes_FromString("\r\n");
    if (colon_space == NULL || crlf == NULL) return NULL;
    int count = 0;
    for (int i = 0; METHODS[i]; i++, count++) {
        method_objects[i] = PyBytes_FromString(METHODS[i]);
        if (method_objects[i] == NULL) return NULL;
        method_lengths[i] = (Py_ssize_t)strlen(METHODS[i]);
    }
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    /* METHODS: the very objects parse_request returns as a method, so that a set of
     * them (exchange.IDEMPOTENT) matches by identity, without a compare. */
    PyObject *shared = PyTuple_New(count);
    if (shared == NULL) goto error;
    for (int i = 0; i < count; i++) {
        Py_INCREF(method_objects[i]);
        PyTuple_SET_ITEM(shared, i, method_objects[i]);
    }
    if (PyModule_AddObject(m, "METHODS", shared) < 0) {
        Py_DECREF(shared);
        goto error;
    }
    return m;
error:
    Py_DECREF(m);
    return NULL;
}

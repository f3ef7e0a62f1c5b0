/*
 * wsprovider._speedups: the byte loops of the large-message path, in C.
 *
 * Optional: setup.py builds it when a C compiler is there, and wsprovider._accel falls
 * back to pure Python (same results, slower) when it is missing or when
 * WSPROVIDER_PURE_PYTHON=1 is set. The test suite runs against both (.ci/run).
 *
 *   unmask(mask, data, offset=0) -> bytes
 *       data XOR the 4-byte WebSocket mask (RFC 6455 5.3), the mask taken from byte
 *       ``offset`` of its cycle (for a frame's payload checked in parts as it arrives).
 *
 *   unmask_ascii(mask, data, offset=0) -> (bytes, bool)
 *       unmask(), and whether the result is all ASCII (so valid UTF-8 without a decode),
 *       found in the same pass.
 *
 *   unmask_frame(data, start, end) -> (bytes, bool)
 *       unmask_ascii() of data[start:end] with the mask in the 4 bytes before ``start``:
 *       a whole frame out of a read, without slicing the read into mask and payload
 *       first (for a 100-byte message that was a fifth of the frame path's cost).
 *
 *   plain_prefix(data, start=0) -> int
 *       The index of the first byte at or after ``start`` that a JSON string literal
 *       cannot hold as it is ('"', '\\' or a C0 control), or len(data) if there is none.
 *       On a frame: where the string literal that opens at ``start - 1`` ends, when it
 *       has no escapes. On a body: len(body) means "needs no escaping".
 *
 *   plain_ascii_prefix(data, start=0) -> int
 *       The same, stopping also at the first byte >= 0x80: len(data) means "ASCII text
 *       that needs no escaping" (valid UTF-8 with no decode).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

/* dst = src XOR the mask from byte ``offset`` of its cycle; returns the OR of all output
 * bytes' high bits (0 when the output is ASCII). */
static int
unmask_into(unsigned char *dst, const unsigned char *src, Py_ssize_t n,
            const unsigned char *key, Py_ssize_t offset)
{
    unsigned char m[8];
    uint64_t m64, w, acc = 0;
    unsigned char tail = 0;
    Py_ssize_t i = 0;
    for (int k = 0; k < 8; k++)
        m[k] = key[(k + (offset & 3)) & 3];
    memcpy(&m64, m, 8);
    for (; i + 8 <= n; i += 8) {
        memcpy(&w, src + i, 8);
        w ^= m64;
        acc |= w;
        memcpy(dst + i, &w, 8);
    }
    for (; i < n; i++) {
        dst[i] = src[i] ^ m[i & 7];
        tail |= dst[i];
    }
    return ((acc & UINT64_C(0x8080808080808080)) != 0) || (tail & 0x80);
}

static PyObject *
unmask_common(PyObject *args, const char *format, int *high)
{
    Py_buffer mask, data;
    Py_ssize_t offset = 0;
    if (!PyArg_ParseTuple(args, format, &mask, &data, &offset))
        return NULL;
    PyObject *out = NULL;
    if (mask.len != 4) {
        PyErr_SetString(PyExc_ValueError, "unmask: the mask must be 4 bytes");
        goto done;
    }
    out = PyBytes_FromStringAndSize(NULL, data.len);
    if (out == NULL)
        goto done;
    *high = unmask_into((unsigned char *)PyBytes_AS_STRING(out), (const unsigned char *)data.buf, data.len,
                        (const unsigned char *)mask.buf, offset);
done:
    PyBuffer_Release(&mask);
    PyBuffer_Release(&data);
    return out;
}

static PyObject *
speedups_unmask(PyObject *self, PyObject *args)
{
    int high;
    return unmask_common(args, "y*y*|n:unmask", &high);
}

static PyObject *
speedups_unmask_ascii(PyObject *self, PyObject *args)
{
    int high = 0;
    PyObject *out = unmask_common(args, "y*y*|n:unmask_ascii", &high);
    if (out == NULL)
        return NULL;
    PyObject *result = PyTuple_Pack(2, out, high ? Py_False : Py_True);
    Py_DECREF(out);
    return result;
}

static PyObject *
speedups_unmask_frame(PyObject *self, PyObject *args)
{
    Py_buffer data;
    Py_ssize_t start, end;
    if (!PyArg_ParseTuple(args, "y*nn:unmask_frame", &data, &start, &end))
        return NULL;
    PyObject *out = NULL, *result = NULL;
    if (start < 4 || end < start || end > data.len) {
        PyErr_SetString(PyExc_ValueError, "unmask_frame: need 4 <= start <= end <= len(data)");
        goto done;
    }
    out = PyBytes_FromStringAndSize(NULL, end - start);
    if (out == NULL)
        goto done;
    const unsigned char *p = (const unsigned char *)data.buf;
    int high = unmask_into((unsigned char *)PyBytes_AS_STRING(out), p + start, end - start, p + start - 4, 0);
    result = PyTuple_Pack(2, out, high ? Py_False : Py_True);
    Py_DECREF(out);
done:
    PyBuffer_Release(&data);
    return result;
}

#define ESCAPED(c) ((c) < 0x20 || (c) == '"' || (c) == '\\')
#define BLOCK 32

static Py_ssize_t
plain_scan(const unsigned char *p, Py_ssize_t n, Py_ssize_t i, int ascii)
{
#if defined(__SSE2__)
    /* 64 bytes per step: a byte is escaped if it equals '"' or '\\', or if max(c, 0x1f)
     * is 0x1f (c <= 0x1f, unsigned); with ``ascii``, a set high bit stops the scan too.
     * The exact index is found by the byte loop below. */
    {
        const __m128i quote = _mm_set1_epi8('"'), bslash = _mm_set1_epi8('\\');
        const __m128i ctl = _mm_set1_epi8(0x1f);
        const __m128i high = _mm_set1_epi8(ascii ? (char)0x80 : 0);
#define BAD16(v) _mm_or_si128(_mm_or_si128(_mm_cmpeq_epi8((v), quote), _mm_cmpeq_epi8((v), bslash)), \
                              _mm_cmpeq_epi8(_mm_max_epu8((v), ctl), ctl))
        while (i + 64 <= n) {
            __m128i a = _mm_loadu_si128((const __m128i *)(p + i));
            __m128i b = _mm_loadu_si128((const __m128i *)(p + i + 16));
            __m128i c = _mm_loadu_si128((const __m128i *)(p + i + 32));
            __m128i d = _mm_loadu_si128((const __m128i *)(p + i + 48));
            __m128i bad = _mm_or_si128(_mm_or_si128(BAD16(a), BAD16(b)), _mm_or_si128(BAD16(c), BAD16(d)));
            __m128i top = _mm_and_si128(_mm_or_si128(_mm_or_si128(a, b), _mm_or_si128(c, d)), high);
            if (_mm_movemask_epi8(_mm_or_si128(bad, top)))
                break;
            i += 64;
        }
#undef BAD16
    }
#else
    /* Whole blocks first: a branch-free test per block, which the compiler vectorises. */
    {
        const unsigned char top = ascii ? 0x80 : 0;
        while (i + BLOCK <= n) {
            unsigned acc = 0;
            for (int k = 0; k < BLOCK; k++) {
                unsigned char c = p[i + k];
                acc |= ESCAPED(c) | ((c & top) != 0);
            }
            if (acc)
                break;
            i += BLOCK;
        }
    }
#endif
    for (; i < n; i++) {
        if (ESCAPED(p[i]) || (ascii && p[i] >= 0x80))
            break;
    }
    return i;
}

static PyObject *
plain_common(PyObject *args, const char *format, int ascii)
{
    Py_buffer data;
    Py_ssize_t start = 0;
    if (!PyArg_ParseTuple(args, format, &data, &start))
        return NULL;
    Py_ssize_t n = data.len, i = start < 0 ? 0 : start;
    if (i > n)
        i = n;
    i = plain_scan((const unsigned char *)data.buf, n, i, ascii);
    PyBuffer_Release(&data);
    return PyLong_FromSsize_t(i);
}

static PyObject *
speedups_plain_prefix(PyObject *self, PyObject *args)
{
    return plain_common(args, "y*|n:plain_prefix", 0);
}

static PyObject *
speedups_plain_ascii_prefix(PyObject *self, PyObject *args)
{
    return plain_common(args, "y*|n:plain_ascii_prefix", 1);
}

static PyMethodDef speedups_methods[] = {
    {"unmask", speedups_unmask, METH_VARARGS,
     "unmask(mask, data, offset=0) -> bytes: data XOR the WebSocket mask from byte offset of its cycle."},
    {"unmask_ascii", speedups_unmask_ascii, METH_VARARGS,
     "unmask_ascii(mask, data, offset=0) -> (bytes, bool): unmask(), and whether the result is all ASCII."},
    {"unmask_frame", speedups_unmask_frame, METH_VARARGS,
     "unmask_frame(data, start, end) -> (bytes, bool): unmask_ascii of data[start:end], the mask before start."},
    {"plain_prefix", speedups_plain_prefix, METH_VARARGS,
     "plain_prefix(data, start=0) -> int: index of the first byte JSON must escape, or len(data)."},
    {"plain_ascii_prefix", speedups_plain_ascii_prefix, METH_VARARGS,
     "plain_ascii_prefix(data, start=0) -> int: the same, stopping also at the first byte >= 0x80."},
    {NULL, NULL, 0, NULL}
};

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT, "wsprovider._speedups",
    "C versions of wsprovider._accel's byte loops (see that module).", -1, speedups_methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModule_Create(&speedups_module);
}

/* Byte-level BPE encoding of ASCII text, exactly as Hugging Face `tokenizers` does it.
 *
 * genloop.data.tokenizer uses this for GPT-2-style byte-level BPE tokenizers (the ones
 * train_bpe makes): the text is split into pre-tokens by the GPT-2 pattern
 *
 *     's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
 *
 * (written out below as a scanner for ASCII, where \p{L} is [A-Za-z], \p{N} is [0-9] and
 * \s is [\t\n\v\f\r ]), and each pre-token is encoded on its own: its bytes become their
 * byte tokens, then the merge of lowest rank among adjacent pairs is applied, everywhere it
 * occurs from left to right, until no adjacent pair has a merge. The ids of a text are the
 * concatenation of its pre-tokens' ids, and pre-tokens repeat, so a cache maps each one
 * seen to its ids; most of a corpus is then a scan, a hash and a copy.
 *
 * The Python side (tokenizer.py) checks that the tokenizer is such a BPE, builds the
 * Encoder from its vocabulary and merges, sends non-ASCII text to the library itself,
 * and keeps a pure-Python path for when this module is not built. Tests compare the ids
 * with Tokenizer.encode on arbitrary text.
 *
 *     Encoder(byte_ids: bytes, merges: bytes, max_words: int = 262144)
 *         byte_ids: 256 uint32 (native order): the token of each byte value
 *         merges:   uint32 triples (left, right, merged) in rank order
 *     Encoder.encode(text: str) -> bytes      uint32 ids, native order; ASCII text only
 *     Encoder.words(text: str) -> list[str]   the pre-tokens (for tests)
 *     Encoder.cached -> int                   pre-tokens in the cache
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define MAX_CACHED_WORD 256 /* longer pre-tokens are encoded every time (as tokenizers does) */

/* ------------------------------------------------------------------- character classes */

enum { WS = 1, ALPHA = 2, DIGIT = 4 };
static uint8_t char_class[128];

static void init_classes(void) {
    for (int c = 0; c < 128; c++) {
        uint8_t k = 0;
        if (c == ' ' || (c >= '\t' && c <= '\r')) k = WS;
        else if ((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z')) k = ALPHA;
        else if (c >= '0' && c <= '9') k = DIGIT;
        char_class[c] = k;
    }
}

#define IS(c, k) (char_class[(c)] & (k))
#define IS_OTHER(c) (char_class[(c)] == 0) /* neither space, letter nor digit */

/* The end of the pre-token that starts at s[i] (i < n): the GPT-2 pattern's leftmost
 * alternative that matches there, as a regex engine picks it. */
static Py_ssize_t next_word(const uint8_t *s, Py_ssize_t n, Py_ssize_t i) {
    uint8_t c = s[i];
    Py_ssize_t j = i + 1;
    if (c == ' ' && j < n && !IS(s[j], WS)) { /* " ?\p{L}+", " ?\p{N}+", " ?[^\s\p{L}\p{N}]+" */
        uint8_t k = char_class[s[j]];
        if (k == 0) k = 0xff; /* the "other" class: compare with IS_OTHER below */
        j++;
        if (k == ALPHA) { while (j < n && IS(s[j], ALPHA)) j++; }
        else if (k == DIGIT) { while (j < n && IS(s[j], DIGIT)) j++; }
        else { while (j < n && IS_OTHER(s[j])) j++; }
        return j;
    }
    if (IS(c, ALPHA)) { while (j < n && IS(s[j], ALPHA)) j++; return j; }
    if (IS(c, DIGIT)) { while (j < n && IS(s[j], DIGIT)) j++; return j; }
    if (c == '\'' && j < n) { /* contractions come first in the pattern */
        uint8_t d = s[j];
        if (d == 's' || d == 't' || d == 'm' || d == 'd') return i + 2;
        if (j + 1 < n) {
            uint8_t e = s[j + 1];
            if ((d == 'r' && e == 'e') || (d == 'v' && e == 'e') || (d == 'l' && e == 'l'))
                return i + 3;
        }
    }
    if (!IS(c, WS)) { while (j < n && IS_OTHER(s[j])) j++; return j; }
    /* "\s+(?!\S)" then "\s+": a run of spaces ends the text, or gives its last space to
     * the pre-token after it; a single space before a non-space stands alone. */
    while (j < n && IS(s[j], WS)) j++;
    if (j < n && j - i >= 2) return j - 1;
    return j;
}

/* --------------------------------------------------------------------------- hashing */

static uint64_t hash_bytes(const uint8_t *p, Py_ssize_t n) {
    uint64_t h = 0xcbf29ce484222325ULL; /* FNV-1a */
    for (Py_ssize_t i = 0; i < n; i++) h = (h ^ p[i]) * 0x100000001b3ULL;
    return h ^ (h >> 29);
}

static uint64_t hash_pair(uint32_t a, uint32_t b) {
    uint64_t x = ((uint64_t)a << 32) | b;
    x ^= x >> 33; x *= 0xff51afd7ed558ccdULL; x ^= x >> 33; x *= 0xc4ceb9fe1a85ec53ULL;
    return x ^ (x >> 33);
}

/* merges: (left, right) -> (rank, merged), open addressing */
typedef struct { uint32_t left, right, rank, merged; int used; } MergeSlot;

/* the word cache: open addressing over entries whose bytes and ids live in two arenas */
typedef struct { uint64_t hash; uint32_t key_off, ids_off; uint16_t key_len, ids_len; uint32_t used; } WordSlot;

typedef struct {
    PyObject_HEAD
    uint32_t byte_ids[256];
    MergeSlot *merges;
    size_t merge_mask;
    WordSlot *words;
    size_t word_mask, n_words;
    uint8_t *keys; size_t keys_len, keys_cap;
    uint32_t *ids; size_t ids_len, ids_cap;
    size_t max_words; /* the cache is emptied when it holds this many pre-tokens */
    uint32_t *work; size_t work_cap; /* a pre-token's symbols while it is merged */
} Encoder;

static const MergeSlot *find_merge(const Encoder *e, uint32_t a, uint32_t b) {
    size_t i = hash_pair(a, b) & e->merge_mask;
    while (e->merges[i].used) {
        if (e->merges[i].left == a && e->merges[i].right == b) return &e->merges[i];
        i = (i + 1) & e->merge_mask;
    }
    return NULL;
}

static size_t pow2_at_least(size_t n) {
    size_t p = 16;
    while (p < n) p <<= 1;
    return p;
}

static void cache_clear(Encoder *e) {
    memset(e->words, 0, (e->word_mask + 1) * sizeof(WordSlot));
    e->n_words = 0;
    e->keys_len = 0;
    e->ids_len = 0;
}

static int grow(void **buf, size_t *cap, size_t need, size_t item) {
    if (need <= *cap) return 0;
    size_t cap2 = *cap ? *cap : 1024;
    while (cap2 < need) cap2 *= 2;
    void *p = PyMem_Realloc(*buf, cap2 * item);
    if (p == NULL) { PyErr_NoMemory(); return -1; }
    *buf = p;
    *cap = cap2;
    return 0;
}

/* ------------------------------------------------------------------------------- BPE */

/* The ids of one pre-token into e->work; returns how many (or -1 on error). */
static Py_ssize_t bpe(Encoder *e, const uint8_t *w, Py_ssize_t n) {
    if (grow((void **)&e->work, &e->work_cap, (size_t)n, sizeof(uint32_t)) < 0) return -1;
    uint32_t *sym = e->work;
    for (Py_ssize_t i = 0; i < n; i++) sym[i] = e->byte_ids[w[i]];
    Py_ssize_t m = n;
    while (m > 1) {
        /* the pair of lowest rank; then merge it at every place, left to right. (Any pair
         * made by a merge ranks after it, so this is the order a priority queue gives.) */
        uint32_t best = UINT32_MAX, left = 0, right = 0, merged = 0;
        for (Py_ssize_t i = 0; i + 1 < m; i++) {
            const MergeSlot *s = find_merge(e, sym[i], sym[i + 1]);
            if (s != NULL && s->rank < best) {
                best = s->rank; left = s->left; right = s->right; merged = s->merged;
            }
        }
        if (best == UINT32_MAX) break;
        Py_ssize_t out = 0;
        for (Py_ssize_t i = 0; i < m; i++) {
            if (i + 1 < m && sym[i] == left && sym[i + 1] == right) {
                sym[out++] = merged;
                i++;
            } else {
                sym[out++] = sym[i];
            }
        }
        m = out;
    }
    return m;
}

/* Append the ids of pre-token w at out + *out_len (room for n more: a byte is at most a
 * token). */
static int encode_word(Encoder *e, const uint8_t *w, Py_ssize_t n, uint32_t *out,
                       size_t *out_len) {
    const uint32_t *ids;
    Py_ssize_t count;
    uint64_t h = 0;
    WordSlot *slot = NULL;
    int cacheable = n <= MAX_CACHED_WORD;
    if (cacheable) {
        h = hash_bytes(w, n);
        size_t i = h & e->word_mask;
        while (e->words[i].used) {
            WordSlot *s = &e->words[i];
            if (s->hash == h && s->key_len == n && memcmp(e->keys + s->key_off, w, n) == 0) {
                memcpy(out + *out_len, e->ids + s->ids_off, s->ids_len * sizeof(uint32_t));
                *out_len += s->ids_len;
                return 0;
            }
            i = (i + 1) & e->word_mask;
        }
        slot = &e->words[i];
    }
    count = bpe(e, w, n);
    if (count < 0) return -1;
    ids = e->work;
    memcpy(out + *out_len, ids, count * sizeof(uint32_t));
    *out_len += count;
    if (!cacheable) return 0;
    if (e->n_words >= e->max_words) {
        cache_clear(e); /* spent: start over (the slot found above is stale) */
        size_t i = h & e->word_mask;
        slot = &e->words[i];
    }
    if (grow((void **)&e->keys, &e->keys_cap, e->keys_len + n, 1) < 0) return -1;
    if (grow((void **)&e->ids, &e->ids_cap, e->ids_len + count, sizeof(uint32_t)) < 0) return -1;
    memcpy(e->keys + e->keys_len, w, n);
    memcpy(e->ids + e->ids_len, ids, count * sizeof(uint32_t));
    *slot = (WordSlot){h, (uint32_t)e->keys_len, (uint32_t)e->ids_len, (uint16_t)n,
                       (uint16_t)count, 1};
    e->keys_len += n;
    e->ids_len += count;
    e->n_words++;
    return 0;
}

/* ------------------------------------------------------------------------ the type */

static int Encoder_init(Encoder *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"byte_ids", "merges", "max_words", NULL};
    Py_buffer byte_ids, merges;
    Py_ssize_t max_words = 1 << 18;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*y*|n", kwlist, &byte_ids, &merges,
                                     &max_words))
        return -1;
    int rc = -1;
    if (byte_ids.len != 256 * (Py_ssize_t)sizeof(uint32_t)) {
        PyErr_SetString(PyExc_ValueError, "byte_ids must hold 256 uint32");
        goto done;
    }
    if (merges.len % (3 * (Py_ssize_t)sizeof(uint32_t)) != 0) {
        PyErr_SetString(PyExc_ValueError, "merges must hold uint32 triples");
        goto done;
    }
    if (max_words < 1 || max_words > (1 << 22)) {
        PyErr_SetString(PyExc_ValueError, "max_words must be in 1..4194304");
        goto done;
    }
    memcpy(self->byte_ids, byte_ids.buf, sizeof(self->byte_ids));
    size_t n_merges = (size_t)merges.len / (3 * sizeof(uint32_t));
    size_t size = pow2_at_least(2 * n_merges + 1);
    PyMem_Free(self->merges);
    self->merges = PyMem_Calloc(size, sizeof(MergeSlot));
    if (self->merges == NULL) { PyErr_NoMemory(); goto done; }
    self->merge_mask = size - 1;
    const uint32_t *m = merges.buf;
    for (size_t r = 0; r < n_merges; r++) {
        uint32_t a = m[3 * r], b = m[3 * r + 1];
        size_t i = hash_pair(a, b) & self->merge_mask;
        while (self->merges[i].used && !(self->merges[i].left == a && self->merges[i].right == b))
            i = (i + 1) & self->merge_mask;
        if (self->merges[i].used) continue; /* a repeated pair keeps its first rank */
        self->merges[i] = (MergeSlot){a, b, (uint32_t)r, m[3 * r + 2], 1};
    }
    self->max_words = (size_t)max_words;
    size_t word_slots = pow2_at_least(2 * (size_t)max_words); /* at most half full */
    PyMem_Free(self->words);
    self->words = PyMem_Calloc(word_slots, sizeof(WordSlot));
    if (self->words == NULL) { PyErr_NoMemory(); goto done; }
    self->word_mask = word_slots - 1;
    cache_clear(self);
    rc = 0;
done:
    PyBuffer_Release(&byte_ids);
    PyBuffer_Release(&merges);
    return rc;
}

static void Encoder_dealloc(Encoder *self) {
    PyMem_Free(self->merges);
    PyMem_Free(self->words);
    PyMem_Free(self->keys);
    PyMem_Free(self->ids);
    PyMem_Free(self->work);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static const uint8_t *ascii_data(PyObject *text, Py_ssize_t *n) {
    if (!PyUnicode_Check(text)) {
        PyErr_SetString(PyExc_TypeError, "text must be a str");
        return NULL;
    }
    if (!PyUnicode_IS_ASCII(text)) {
        PyErr_SetString(PyExc_ValueError, "text must be ASCII (other text goes to tokenizers)");
        return NULL;
    }
    *n = PyUnicode_GET_LENGTH(text);
    return PyUnicode_1BYTE_DATA(text);
}

static PyObject *Encoder_encode(Encoder *self, PyObject *text) {
    if (self->merges == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Encoder not initialized");
        return NULL;
    }
    Py_ssize_t n;
    const uint8_t *s = ascii_data(text, &n);
    if (s == NULL) return NULL;
    /* written in place into a bytes object of the longest size, then shrunk */
    PyObject *result = PyBytes_FromStringAndSize(NULL, n * (Py_ssize_t)sizeof(uint32_t));
    if (result == NULL) return NULL;
    uint32_t *out = (uint32_t *)PyBytes_AS_STRING(result);
    size_t out_len = 0;
    for (Py_ssize_t i = 0; i < n;) {
        Py_ssize_t j = next_word(s, n, i);
        if (encode_word(self, s + i, j - i, out, &out_len) < 0) {
            Py_DECREF(result);
            return NULL;
        }
        i = j;
    }
    if (_PyBytes_Resize(&result, (Py_ssize_t)(out_len * sizeof(uint32_t))) < 0) return NULL;
    return result;
}

static PyObject *Encoder_words(Encoder *self, PyObject *text) {
    Py_ssize_t n;
    const uint8_t *s = ascii_data(text, &n);
    if (s == NULL) return NULL;
    PyObject *list = PyList_New(0);
    if (list == NULL) return NULL;
    for (Py_ssize_t i = 0; i < n;) {
        Py_ssize_t j = next_word(s, n, i);
        PyObject *w = PyUnicode_FromStringAndSize((const char *)s + i, j - i);
        if (w == NULL || PyList_Append(list, w) < 0) {
            Py_XDECREF(w);
            Py_DECREF(list);
            return NULL;
        }
        Py_DECREF(w);
        i = j;
    }
    return list;
}

static PyObject *Encoder_cached(Encoder *self, void *closure) {
    return PyLong_FromSize_t(self->n_words);
}

static PyMethodDef Encoder_methods[] = {
    {"encode", (PyCFunction)Encoder_encode, METH_O,
     "encode(text: str) -> bytes\n\nThe ids of ASCII text, uint32 in native byte order."},
    {"words", (PyCFunction)Encoder_words, METH_O,
     "words(text: str) -> list[str]\n\nThe pre-tokens of ASCII text (GPT-2 pattern)."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Encoder_getset[] = {
    {"cached", (getter)Encoder_cached, NULL, "pre-tokens in the cache", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject EncoderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "genloop.data._bpe.Encoder",
    .tp_basicsize = sizeof(Encoder),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Byte-level BPE over ASCII text with a pre-token cache.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Encoder_init,
    .tp_dealloc = (destructor)Encoder_dealloc,
    .tp_methods = Encoder_methods,
    .tp_getset = Encoder_getset,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_bpe", "Byte-level BPE encoding of ASCII text (see _bpe.c).", -1,
};

PyMODINIT_FUNC PyInit__bpe(void) {
    init_classes();
    if (PyType_Ready(&EncoderType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    Py_INCREF(&EncoderType);
    if (PyModule_AddObject(m, "Encoder", (PyObject *)&EncoderType) < 0) {
        Py_DECREF(&EncoderType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}

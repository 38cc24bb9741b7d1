/* Test-only: keep CPython's freed 16 KiB frame-stack chunks for reuse (tests/conftest.py loads this).
 *
 * CPython 3.11 keeps frames in 16 KiB chunks taken from the object arena allocator (mmap) and
 * returns a chunk to it (munmap) as soon as its first frame returns. A call depth that swings
 * across a chunk's edge -- the Triton interpreter's per-operation calls do, all through the
 * kernel tests -- maps and unmaps a chunk on every swing: 479,000 mmap/munmap pairs and 3.8 s of
 * system time in one 13 s interpreter test (2026-11-29, strace -c). This allocator hands the
 * chunk-sized blocks it is given back to the next chunk-sized request (at most KEEP of them) and
 * passes every other size to the allocator it replaced. The blocks are CPython's own, reused as
 * CPython reuses a chunk it still holds: nothing it computes changes. Called with the GIL held. */
#include <Python.h>

#define CHUNK 16384
#define KEEP 64

static PyObjectArenaAllocator previous;
static void *kept[KEEP];
static int n_kept;

static void *chunk_alloc(void *ctx, size_t size) {
    (void)ctx;
    if (size == CHUNK && n_kept > 0)
        return kept[--n_kept];
    return previous.alloc(previous.ctx, size);
}

static void chunk_free(void *ctx, void *ptr, size_t size) {
    (void)ctx;
    if (size == CHUNK && n_kept < KEEP) {
        kept[n_kept++] = ptr;
        return;
    }
    previous.free(previous.ctx, ptr, size);
}

/* Install once per process; returns 1 when installed by this call, 0 if it already was. */
int xtk_keep_frame_chunks(void) {
    static int installed;
    PyObjectArenaAllocator mine = {NULL, chunk_alloc, chunk_free};
    if (installed)
        return 0;
    PyObject_GetArenaAllocator(&previous);
    PyObject_SetArenaAllocator(&mine);
    installed = 1;
    return 1;
}

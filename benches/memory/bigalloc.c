// Keeps the allocations of 1 MiB or more a process makes (malloc and posix_memalign, which libtorch's CPU
// allocator uses) and, at exit, writes those live at the high-water mark of their sum with their call stacks to
// $BIGALLOC_OUT.<pid> (symbolise hytrain's frames with addr2line -f -C -e <binary> <offset>). Used for the README's
// breakdown of ZeRO-2's peak (issue 17):
//   gcc -O1 -shared -fPIC -o /tmp/bigalloc.so benches/memory/bigalloc.c -ldl -lpthread
//   LD_PRELOAD=/tmp/bigalloc.so BIGALLOC_OUT=/tmp/ba OMP_NUM_THREADS=1 hytrain launch --nproc-per-node 4 -- \
//     hytrain train --model mlp:4096,4096,4096,4096 --optimizer adamw --shard gradients --max-steps 4 ...
#define _GNU_SOURCE
#include <dlfcn.h>
#include <execinfo.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>
#include <unistd.h>
#define BIG (1<<20)
#define MAXL 4096
#define DEPTH 24
typedef struct { void *p; size_t n; void *bt[DEPTH]; int d; } rec;
static rec live[MAXL]; static rec snap[MAXL]; static int nsnap; static size_t cur, peak;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static int (*real_pm)(void**, size_t, size_t); static void (*real_free)(void*);
static void *(*real_malloc)(size_t);
static __thread int inhook;
static void add(void *p, size_t n) {
  if (!p || n < BIG || inhook) return;
  inhook = 1;
  void *bt[DEPTH]; int d = backtrace(bt, DEPTH);
  pthread_mutex_lock(&mu);
  for (int i = 0; i < MAXL; i++) if (!live[i].p) { live[i].p = p; live[i].n = n; memcpy(live[i].bt, bt, sizeof bt); live[i].d = d; break; }
  cur += n;
  if (cur > peak) { peak = cur; nsnap = 0; for (int i = 0; i < MAXL; i++) if (live[i].p) snap[nsnap++] = live[i]; }
  pthread_mutex_unlock(&mu);
  inhook = 0;
}
static void del(void *p) {
  if (!p) return;
  pthread_mutex_lock(&mu);
  for (int i = 0; i < MAXL; i++) if (live[i].p == p) { cur -= live[i].n; live[i].p = 0; break; }
  pthread_mutex_unlock(&mu);
}
int posix_memalign(void **m, size_t a, size_t n) {
  if (!real_pm) real_pm = dlsym(RTLD_NEXT, "posix_memalign");
  int r = real_pm(m, a, n); if (!r) add(*m, n); return r;
}
void *malloc(size_t n) {
  if (!real_malloc) real_malloc = dlsym(RTLD_NEXT, "malloc");
  void *p = real_malloc(n); if (n >= BIG) add(p, n); return p;
}
void free(void *p) {
  if (!real_free) real_free = dlsym(RTLD_NEXT, "free");
  if (p) del(p); real_free(p);
}
__attribute__((destructor)) static void dump(void) {
  char *w = getenv("BIGALLOC_OUT"); if (!w) return;
  char path[256]; snprintf(path, sizeof path, "%s.%d", w, getpid());
  FILE *f = fopen(path, "w"); if (!f) return;
  fprintf(f, "peak %zu MiB in %d big allocations\n", peak >> 20, nsnap);
  for (int i = 0; i < nsnap; i++) {
    fprintf(f, "== %zu KiB\n", snap[i].n >> 10); fflush(f);
    backtrace_symbols_fd(snap[i].bt, snap[i].d, fileno(f));
  }
  fclose(f);
}

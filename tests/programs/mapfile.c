/* Map SHARED_FILE with MAP_SHARED and PRIVATE_FILE with MAP_PRIVATE, both
 * read-write, and write a step's pattern into one page of each per step
 * (sleeping MS between steps), msync'ing the shared one after each step (so
 * each write faults and updates the file's mtime, as a program that keeps
 * its data file in sync does). Prints "step I" per step; at the end prints
 * checksums of both mappings and exits 7.
 *
 *   mapfile SHARED_FILE PRIVATE_FILE STEPS MS */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static uint64_t fnv(const unsigned char *p, size_t n)
{
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++)
        h = (h ^ p[i]) * 0x100000001b3ull;
    return h;
}

static unsigned char *map(const char *path, int flags, size_t *len)
{
    int fd = open(path, O_RDWR);
    struct stat st;
    if (fd < 0 || fstat(fd, &st))
        exit(100);
    *len = st.st_size;
    void *p = mmap(NULL, *len, PROT_READ | PROT_WRITE, flags, fd, 0);
    if (p == MAP_FAILED)
        exit(101);
    close(fd);                  /* the mapping keeps the file */
    return p;
}

int main(int argc, char **argv)
{
    if (argc < 5)
        return 99;
    size_t slen, plen;
    unsigned char *shared = map(argv[1], MAP_SHARED, &slen);
    unsigned char *priv = map(argv[2], MAP_PRIVATE, &plen);
    int steps = atoi(argv[3]);
    long ms = atol(argv[4]);
    size_t spages = slen / 4096, ppages = plen / 4096;
    uint64_t seen = 0;
    for (int s = 0; s < steps; s++) {
        unsigned char *sp = shared + (s % spages) * 4096;
        unsigned char *pp = priv + ((s * 3) % ppages) * 4096;
        for (int i = 0; i < 4096; i += 8) {
            sp[i] = (unsigned char)(s * 7 + i);
            pp[i + 1] = (unsigned char)(s * 13 + i);
        }
        /* read a private page this step did not write (not a shared one:
         * a restored checkpoint re-runs steps whose shared writes the
         * original already made, so it may see them early) */
        seen = seen * 31 + fnv(priv + ((s + 5) % ppages) * 4096, 4096);
        if (msync(shared, slen, MS_SYNC))   /* clean again: next write faults */
            return 102;
        printf("step %d\n", s);
        fflush(stdout);
        struct timespec ts = { ms / 1000, ms % 1000 * 1000000 };
        while (nanosleep(&ts, &ts))
            ;
    }
    if (msync(shared, slen, MS_SYNC))
        return 102;
    printf("shared %016llx private %016llx seen %016llx\n",
           (unsigned long long)fnv(shared, slen), (unsigned long long)fnv(priv, plen),
           (unsigned long long)seen);
    fflush(stdout);
    return 7;
}

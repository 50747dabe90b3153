/* Print "ready" to stdout and sleep until killed.
 *   sleeper            plain
 *   sleeper pipe       with a pipe at fds 3 and 4 (ckpt refuses pipes)
 *   sleeper child      with a child process (ckpt refuses process trees) */
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#ifdef CKPT_TEST_VARIANT        /* another build of it: other bytes, other build-id */
#define READY "ready (variant) %s\n"
#else
#define READY "ready %s\n"
#endif

int main(int argc, char **argv)
{
    const char *mode = argc > 1 ? argv[1] : "";
    int p[2];
    if (!strcmp(mode, "pipe") && pipe(p))
        return 100;
    if (!strcmp(mode, "child") && fork() == 0) {
        for (;;)
            pause();
    }
    printf(READY, mode);
    fflush(stdout);
    for (;;)
        pause();
}

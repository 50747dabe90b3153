/* Sleep in nanosleep N times, printing a tick (with running state) to
 * stdout before each sleep; then exit 3.   nsleep N MS */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

int main(int argc, char **argv)
{
    int n = argc > 1 ? atoi(argv[1]) : 10;
    long ms = argc > 2 ? atol(argv[2]) : 1000;
    unsigned long long acc = 1;
    for (int i = 0; i < n; i++) {
        acc = acc * 6364136223846793005ull + i;
        printf("tick %d %016llx\n", i, acc);
        fflush(stdout);
        struct timespec ts = { ms / 1000, ms % 1000 * 1000000 };
        while (nanosleep(&ts, &ts))
            ;
    }
    printf("done %016llx\n", acc);
    fflush(stdout);
    return 3;
}

/* Uses glibc's cached thread id (struct pthread.tid) after a restore.
 *   tidcache N MS     N ticks of MS ms (printing "tick i"), then checks:
 *     1  raise(SIGUSR1) ran the handler
 *     2  pthread_kill(pthread_self(), SIGUSR2) ran the handler
 *     4  pthread_getaffinity_np(pthread_self()) works (sched_getaffinity(pd->tid))
 *     8  pthread_getcpuclockid(pthread_self()) gives a working clock
 *    16  the TCB tid (via pthread_getcpuclockid's clock id) is gettid()
 * prints "result MASK" and exits 10 + MASK (41 when all pass). */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t got1, got2;

static void on_usr1(int sig) { (void)sig; got1 = 1; }
static void on_usr2(int sig) { (void)sig; got2 = 1; }

int main(int argc, char **argv)
{
    int n = argc > 1 ? atoi(argv[1]) : 5;
    long ms = argc > 2 ? atol(argv[2]) : 0;
    int mask = 0;
    cpu_set_t set;
    clockid_t cid;
    struct timespec ts;

    signal(SIGUSR1, on_usr1);
    signal(SIGUSR2, on_usr2);
    for (int i = 0; i < n; i++) {
        printf("tick %d\n", i);
        fflush(stdout);
        ts.tv_sec = ms / 1000;
        ts.tv_nsec = ms % 1000 * 1000000;
        while (nanosleep(&ts, &ts))
            ;
    }
    if (raise(SIGUSR1) == 0 && got1)
        mask |= 1;
    if (pthread_kill(pthread_self(), SIGUSR2) == 0 && got2)
        mask |= 2;
    if (pthread_getaffinity_np(pthread_self(), sizeof set, &set) == 0)
        mask |= 4;
    if (pthread_getcpuclockid(pthread_self(), &cid) == 0 &&
        clock_gettime(cid, &ts) == 0)
        mask |= 8;
    /* CPUCLOCK_PERTHREAD: clock id = ~tid << 3 | 4 | CPUCLOCK_SCHED(2) */
    if (pthread_getcpuclockid(pthread_self(), &cid) == 0 &&
        (int)~(cid >> 3) == gettid())
        mask |= 16;
    printf("result %d\n", mask);
    fflush(stdout);
    return 10 + mask;
}

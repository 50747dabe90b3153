/* Robust mutexes held across a checkpoint.
 *   robust N MS [late]
 * main holds robust mutex m1 (thread B blocks in pthread_mutex_lock on it);
 * thread C holds robust mutex m2 and exits holding it. main ticks N times
 * (MS ms each), then:
 *    1  pthread_mutex_unlock(m1) by main succeeds (owner is main's tid)
 *    2  B got m1, and 4: B's unlock succeeded
 *    8  main's lock of m2 says EOWNERDEAD (the kernel saw C die as owner)
 *   16  pthread_mutex_consistent + unlock of m2 succeed
 * prints "result MASK", exits 10 + MASK (41 when all pass).
 * "late": B starts waiting for m1 only at tick N - 3 (not while a dump of
 * an early tick is taken). glibc's lock keeps the caller's tid in a
 * register while it waits and stores it as the owner when it gets the
 * mutex: a thread waiting at dump time and restored under a new id owns
 * the mutex under its old id (its unlock says EPERM). */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static pthread_mutex_t m1, m2;
static int n_ticks;
static long ms;
static volatile int b_mask, b_go = 1;

static void nap(long m)
{
    struct timespec ts = { m / 1000, m % 1000 * 1000000 };
    while (nanosleep(&ts, &ts))
        ;
}

static void *b_main(void *arg)
{
    (void)arg;
    while (!b_go)
        nap(5);
    if (pthread_mutex_lock(&m1) == 0)
        b_mask |= 2;
    if (pthread_mutex_unlock(&m1) == 0)
        b_mask |= 4;
    return NULL;
}

static void *c_main(void *arg)
{
    (void)arg;
    pthread_mutex_lock(&m2);
    printf("C holds m2\n");
    fflush(stdout);
    nap(n_ticks * ms / 2);
    return NULL;            /* exits holding m2 */
}

int main(int argc, char **argv)
{
    pthread_mutexattr_t a;
    pthread_t b, c;
    int mask = 0, r;

    n_ticks = argc > 1 ? atoi(argv[1]) : 5;
    ms = argc > 2 ? atol(argv[2]) : 10;
    if (argc > 3)
        b_go = 0;
    pthread_mutexattr_init(&a);
    pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST);
    pthread_mutex_init(&m1, &a);
    pthread_mutex_init(&m2, &a);
    pthread_mutex_lock(&m1);
    pthread_create(&b, NULL, b_main, NULL);
    pthread_create(&c, NULL, c_main, NULL);
    for (int i = 0; i < n_ticks; i++) {
        if (i == n_ticks - 3)
            b_go = 1;
        printf("tick %d\n", i);
        fflush(stdout);
        nap(ms);
    }
    if (pthread_mutex_unlock(&m1) == 0)
        mask |= 1;
    pthread_join(b, NULL);
    pthread_join(c, NULL);
    r = pthread_mutex_lock(&m2);
    if (r == EOWNERDEAD)
        mask |= 8;
    if (r == EOWNERDEAD && pthread_mutex_consistent(&m2) == 0 &&
        pthread_mutex_unlock(&m2) == 0)
        mask |= 16;
    mask |= b_mask;
    printf("result %d\n", mask);
    fflush(stdout);
    return 10 + mask;
}

/* POSIX timers driving a program, with ids that have a gap.
 *   rtimer N M
 * timer 0 is created and deleted (a gap); timer A (id 1): CLOCK_MONOTONIC,
 * SIGEV_SIGNAL SIGRTMIN with sigev_value 0x1234, every 20 ms; timer B
 * (id 2): SIGEV_THREAD_ID SIGRTMIN+1 to worker thread W, every 30 ms.
 * main pause()s until A fired N times (printing "tick i" each time), W
 * pause()s until B fired M times. Result bits:
 *    1  every A signal had si_code SI_TIMER and the value 0x1234
 *    2  every B signal ran in W
 *    4  timer_delete of ids 1 and 2 works, and 8: id 0 is still free
 * prints "result MASK", exits 10 + MASK (25 when all pass). */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/syscall.h>

static volatile int count_a, count_b, bad_a, bad_b;
static pthread_t w_thread;
static int m;

static void on_a(int sig, siginfo_t *si, void *uc)
{
    (void)sig; (void)uc;
    if (si->si_code != SI_TIMER || si->si_value.sival_int != 0x1234)
        bad_a++;
    count_a++;
}

static void on_b(int sig, siginfo_t *si, void *uc)
{
    (void)sig; (void)si; (void)uc;
    if (!pthread_equal(pthread_self(), w_thread))
        bad_b++;
    count_b++;
}

static volatile int w_tid;

static void *w_main(void *arg)
{
    (void)arg;
    w_tid = gettid();
    while (count_b < m)
        pause();
    return NULL;
}

static int make(int notify, int sig, int tid, long value, long ms)
{
    struct sigevent ev;
    int id = -1;
    memset(&ev, 0, sizeof ev);
    ev.sigev_notify = notify;
    ev.sigev_signo = sig;
    ev.sigev_value.sival_ptr = (void *)value;
    ev._sigev_un._tid = tid;
    if (syscall(SYS_timer_create, CLOCK_MONOTONIC, &ev, &id))
        return -1;
    if (ms) {
        struct itimerspec its = { { 0, ms * 1000000 }, { 0, ms * 1000000 } };
        syscall(SYS_timer_settime, id, 0, &its, NULL);
    }
    return id;
}

int main(int argc, char **argv)
{
    int n = argc > 1 ? atoi(argv[1]) : 10;
    int mask = 0, a, b, z, seen = 0;
    sigset_t set;
    struct sigaction sa;

    m = argc > 2 ? atoi(argv[2]) : 5;
    memset(&sa, 0, sizeof sa);
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    sigemptyset(&sa.sa_mask);
    sa.sa_sigaction = on_a;
    sigaction(SIGRTMIN, &sa, NULL);
    sa.sa_sigaction = on_b;
    sigaction(SIGRTMIN + 1, &sa, NULL);
    /* W never takes A's signal (it inherits the block), main never B's. */
    sigemptyset(&set);
    sigaddset(&set, SIGRTMIN);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    pthread_create(&w_thread, NULL, w_main, NULL);
    pthread_sigmask(SIG_UNBLOCK, &set, NULL);
    sigemptyset(&set);
    sigaddset(&set, SIGRTMIN + 1);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    while (!w_tid)
        usleep(1000);
    z = make(SIGEV_NONE, 0, 0, 0, 0);
    a = make(SIGEV_SIGNAL, SIGRTMIN, 0, 0x1234, 20);
    b = make(SIGEV_THREAD_ID, SIGRTMIN + 1, w_tid, 0, 30);
    syscall(SYS_timer_delete, z);
    if (z != 0 || a != 1 || b != 2)
        return 100;
    while (count_a < n) {
        pause();
        while (seen < count_a && seen < n)
            printf("tick %d\n", seen++);
        fflush(stdout);
    }
    pthread_join(w_thread, NULL);
    if (!bad_a)
        mask |= 1;
    if (!bad_b)
        mask |= 2;
    if (syscall(SYS_timer_delete, a) == 0 && syscall(SYS_timer_delete, b) == 0)
        mask |= 4;
    if (syscall(SYS_timer_delete, 0) == -1 && errno == EINVAL)
        mask |= 8;
    printf("result %d\n", mask);
    fflush(stdout);
    return 10 + mask;
}

/* Threads receiving signals from pthread_kill, handled on their own
 * alternate signal stacks.
 *   sigalt ROUNDS MS
 * 4 threads, each with a sigaltstack and sleeping in nanosleep; SIGUSR1
 * (SA_ONSTACK) counts per thread and checks the handler runs on that
 * thread's alternate stack. main, each round, pthread_kills every thread,
 * waits until all counted it, prints "round r", sleeps MS. Pending all
 * along (every thread blocks them): SIGUSR2 for thread 0 (pthread_kill)
 * and two queued SIGRTMIN+2 for the process (sigqueue, values 1 and 2);
 * thread 0 unblocks SIGUSR2 as it ends, main SIGRTMIN+2 after the joins.
 * At the end: "result OK" and exit 7, or "result BAD ..." and exit 1. */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define N 4
#define ALT (64 * 1024)

static char altmem[N][ALT] __attribute__((aligned(16)));
static volatile int count[N], bad[N], done;
static __thread int me = -1;
static volatile int usr2_in, rt_count, rt_sum;

static void on_usr2(int sig)
{
    (void)sig;
    usr2_in = me + 100;
}

static void on_rt(int sig, siginfo_t *si, void *uc)
{
    (void)sig; (void)uc;
    rt_count++;
    rt_sum += si->si_value.sival_int;
}

static void nap(long m)
{
    struct timespec ts = { m / 1000, m % 1000 * 1000000 };
    while (nanosleep(&ts, &ts))
        ;
}

static void on_usr1(int sig)
{
    char here;
    (void)sig;
    if (me < 0)
        return;
    if (&here < altmem[me] || &here >= altmem[me] + ALT)
        bad[me]++;
    count[me]++;
}

static void *worker(void *arg)
{
    stack_t ss;
    me = (int)(long)arg;
    ss.ss_sp = altmem[me];
    ss.ss_size = ALT;
    ss.ss_flags = 0;
    if (sigaltstack(&ss, NULL))
        bad[me] = 1000;
    while (!done)
        nap(5);
    if (me == 0) {
        sigset_t u;
        sigemptyset(&u);
        sigaddset(&u, SIGUSR2);
        pthread_sigmask(SIG_UNBLOCK, &u, NULL);
    }
    return NULL;
}

int main(int argc, char **argv)
{
    int rounds = argc > 1 ? atoi(argv[1]) : 10;
    long ms = argc > 2 ? atol(argv[2]) : 10;
    pthread_t th[N];
    struct sigaction sa;

    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr1;
    sa.sa_flags = SA_ONSTACK | SA_RESTART;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGUSR1, &sa, NULL);
    sa.sa_handler = on_usr2;
    sigaction(SIGUSR2, &sa, NULL);
    sa.sa_sigaction = on_rt;
    sa.sa_flags = SA_SIGINFO;
    sigaction(SIGRTMIN + 2, &sa, NULL);
    sigset_t blk;
    sigemptyset(&blk);
    sigaddset(&blk, SIGUSR2);
    sigaddset(&blk, SIGRTMIN + 2);
    pthread_sigmask(SIG_BLOCK, &blk, NULL);
    for (long i = 0; i < N; i++)
        pthread_create(&th[i], NULL, worker, (void *)i);
    nap(20);
    pthread_kill(th[0], SIGUSR2);
    for (int v = 1; v <= 2; v++) {
        union sigval val = { .sival_int = v };
        sigqueue(getpid(), SIGRTMIN + 2, val);
    }
    for (int r = 0; r < rounds; r++) {
        for (int i = 0; i < N; i++)
            if (pthread_kill(th[i], SIGUSR1))
                bad[i] += 100;
        for (int i = 0; i < N; i++)
            while (count[i] < r + 1 && !bad[i])
                nap(1);
        printf("round %d\n", r);
        fflush(stdout);
        nap(ms);
    }
    done = 1;
    for (int i = 0; i < N; i++)
        pthread_join(th[i], NULL);
    pthread_sigmask(SIG_UNBLOCK, &blk, NULL);
    if (usr2_in != 100 || rt_count != 2 || rt_sum != 3) {
        printf("result BAD pending: usr2 in %d, rt %d/%d\n", usr2_in - 100, rt_count, rt_sum);
        return 1;
    }
    for (int i = 0; i < N; i++)
        if (bad[i] || count[i] != rounds) {
            printf("result BAD thread %d count %d bad %d\n", i, count[i], bad[i]);
            return 1;
        }
    printf("result OK\n");
    fflush(stdout);
    return 7;
}

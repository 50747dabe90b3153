/* prctl state a program relies on, read back after N ticks of MS ms:
 * PR_SET_PDEATHSIG (SIGUSR2), PR_SET_DUMPABLE 0, PR_SET_CHILD_SUBREAPER 1,
 * PR_SET_NO_NEW_PRIVS 1, and a thread's own name (PR_SET_NAME), policy
 * (SCHED_BATCH) and nice value (7), read by that thread as it ends.
 *   pstate N MS     prints "state PDEATHSIG DUMPABLE SUBREAPER NNP NAME POLICY NICE",
 *                   exits 12 */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sched.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <unistd.h>
#include <time.h>

static volatile int stop, policy = -1, nice_val = -99;

static void *named(void *arg)
{
    (void)arg;
    struct sched_param sp = { 0 };
    prctl(PR_SET_NAME, "worker-7");
    sched_setscheduler(0, SCHED_BATCH, &sp);
    setpriority(PRIO_PROCESS, 0, 7);
    while (!stop) {
        struct timespec ts = { 0, 5000000 };
        nanosleep(&ts, NULL);
    }
    policy = sched_getscheduler(0);
    nice_val = getpriority(PRIO_PROCESS, 0);
    return NULL;
}

int main(int argc, char **argv)
{
    int n = argc > 1 ? atoi(argv[1]) : 3;
    long ms = argc > 2 ? atol(argv[2]) : 10;
    int pdeath = 0, sub = 0;
    char name[32] = "";
    pthread_t t;

    signal(SIGUSR2, SIG_IGN);
    prctl(PR_SET_PDEATHSIG, SIGUSR2);
    prctl(PR_SET_DUMPABLE, 0);
    prctl(PR_SET_CHILD_SUBREAPER, 1);
    prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
    pthread_create(&t, NULL, named, NULL);
    for (int i = 0; i < n; i++) {
        struct timespec ts = { ms / 1000, ms % 1000 * 1000000 };
        printf("tick %d\n", i);
        fflush(stdout);
        while (nanosleep(&ts, &ts))
            ;
    }
    prctl(PR_GET_PDEATHSIG, &pdeath);
    prctl(PR_GET_CHILD_SUBREAPER, &sub);
    pthread_getname_np(t, name, sizeof name);
    stop = 1;
    pthread_join(t, NULL);
    printf("state %d %d %d %d %s %d %d\n", pdeath, prctl(PR_GET_DUMPABLE), sub,
           prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0), name, policy, nice_val);
    fflush(stdout);
    return 12;
}

/* Wait in pause() for a signal three times; print the count each time it
 * wakes; exit 4.  The handler is the program's own (sigaction).
 *   pausesig          woken by SIGUSR1 from outside
 *   pausesig alarm    woken by SIGALRM from a 300 ms setitimer armed before
 *                     each pause() */
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/time.h>
#include <unistd.h>

static volatile sig_atomic_t count;

static void on_signal(int sig)
{
    (void)sig;
    count++;
}

int main(int argc, char **argv)
{
    int alarm_mode = argc > 1 && !strcmp(argv[1], "alarm");
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGUSR1, &sa, NULL) || sigaction(SIGALRM, &sa, NULL))
        return 100;
    while (count < 3) {
        printf("count %d\n", (int)count);
        fflush(stdout);
        if (alarm_mode) {
            struct itimerval it = { { 0, 0 }, { 0, 300000 } };
            if (setitimer(ITIMER_REAL, &it, NULL))
                return 101;
        }
        pause();
    }
    printf("done %d\n", (int)count);
    fflush(stdout);
    return 4;
}

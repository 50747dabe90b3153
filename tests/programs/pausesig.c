/* Wait in pause() for SIGUSR1 three times; print the count each time it
 * wakes; exit 4.  The handler is the program's own (sigaction). */
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static volatile sig_atomic_t count;

static void on_usr1(int sig)
{
    (void)sig;
    count++;
}

int main(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr1;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGUSR1, &sa, NULL))
        return 100;
    while (count < 3) {
        printf("count %d\n", (int)count);
        fflush(stdout);
        pause();
    }
    printf("done %d\n", (int)count);
    fflush(stdout);
    return 4;
}

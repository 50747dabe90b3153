/* 8 pthreads sharing a mutex and a condition variable:
 *   3 consumers  blocked in pthread_cond_wait for items
 *   3 computers  busy with arithmetic, adding into the total now and then
 *   2 producers  nanosleep, then queue an item and signal
 * main joins them all (blocked in pthread_join) and prints the checksum,
 * the same however the threads interleave; exits 20 + checksum % 200.
 *   threads8 ITEMS SLEEP_MS ROUNDS */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static unsigned long long queue[4096];
static int head, tail, producers_left = 2, items;
static long sleep_ms;
static int rounds;
static unsigned long long total;

static unsigned long long mix(unsigned long long x)
{
    x ^= x >> 31; x *= 0x7fb5d329728ea185ull; x ^= x >> 27;
    x *= 0x81dadef4bc2dd44dull; x ^= x >> 33;
    return x;
}

static void *consumer(void *arg)
{
    unsigned long long mine = 0;
    (void)arg;
    pthread_mutex_lock(&mu);
    for (;;) {
        while (head == tail && producers_left)
            pthread_cond_wait(&cv, &mu);
        if (head == tail)
            break;
        mine += mix(queue[head++ % 4096]);
    }
    total += mine;
    pthread_mutex_unlock(&mu);
    return NULL;
}

static void *producer(void *arg)
{
    long id = (long)arg;
    for (int i = 0; i < items; i++) {
        struct timespec ts = { sleep_ms / 1000, sleep_ms % 1000 * 1000000 };
        while (nanosleep(&ts, &ts))
            ;
        pthread_mutex_lock(&mu);
        queue[tail++ % 4096] = id * 1000003 + i;
        printf("produced %ld %d\n", id, i);
        fflush(stdout);
        pthread_cond_signal(&cv);
        pthread_mutex_unlock(&mu);
    }
    pthread_mutex_lock(&mu);
    producers_left--;
    pthread_cond_broadcast(&cv);
    pthread_mutex_unlock(&mu);
    return NULL;
}

static void *computer(void *arg)
{
    unsigned long long x = (unsigned long long)(long)arg;
    double f = 1.0;
    for (int r = 0; r < rounds; r++) {
        for (int i = 0; i < 1000000; i++) {
            x = x * 6364136223846793005ull + 1442695040888963407ull;
            f = f * 0.999999 + (double)(x >> 60);
        }
        pthread_mutex_lock(&mu);
        total += x ^ (unsigned long long)f;
        pthread_mutex_unlock(&mu);
    }
    return NULL;
}

int main(int argc, char **argv)
{
    pthread_t th[8];
    items = argc > 1 ? atoi(argv[1]) : 30;
    sleep_ms = argc > 2 ? atol(argv[2]) : 30;
    rounds = argc > 3 ? atoi(argv[3]) : 100;
    for (long i = 0; i < 3; i++)
        pthread_create(&th[i], NULL, consumer, (void *)i);
    for (long i = 0; i < 3; i++)
        pthread_create(&th[3 + i], NULL, computer, (void *)(i + 1));
    for (long i = 0; i < 2; i++)
        pthread_create(&th[6 + i], NULL, producer, (void *)(i + 1));
    for (int i = 0; i < 8; i++)
        if (pthread_join(th[i], NULL))
            return 101;
    printf("checksum %016llx\n", total);
    fflush(stdout);
    return 20 + (int)(total % 200);
}

/* Fill a big heap buffer with a pattern, then stir it in rounds, keeping a
 * running checksum. Progress goes to two files it holds open: PROGRESS
 * (plain, written at its own offset) and APPENDLOG (O_APPEND). The final
 * line also goes to stdout; the exit status is derived from the checksum.
 *
 *   heap PROGRESS APPENDLOG SIZE_MIB ROUNDS [SLEEP_MS]
 */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static int progress_fd, append_fd;

static void say(const char *fmt, unsigned long long a, unsigned long long b, double c)
{
    char line[160];
    int n = snprintf(line, sizeof line, fmt, a, b, c);
    if (write(progress_fd, line, n) != n || write(append_fd, line, n) != n)
        exit(101);
}

int main(int argc, char **argv)
{
    if (argc < 5) {
        fprintf(stderr, "usage: heap PROGRESS APPENDLOG SIZE_MIB ROUNDS [SLEEP_MS]\n");
        return 100;
    }
    progress_fd = open(argv[1], O_WRONLY | O_CREAT | O_TRUNC, 0644);
    append_fd = open(argv[2], O_WRONLY | O_CREAT | O_TRUNC | O_APPEND, 0644);
    if (progress_fd < 0 || append_fd < 0)
        return 102;
    size_t words = (size_t)atoi(argv[3]) << 17;        /* MiB / 8 bytes */
    int rounds = atoi(argv[4]);
    long sleep_ms = argc > 5 ? atol(argv[5]) : 0;
    uint64_t *buf = malloc(words * sizeof *buf);
    if (!buf)
        return 103;

    uint64_t sum = 0;
    double acc = 0;
    size_t chunk = words / 16;
    for (int c = 0; c < 16; c++) {
        for (size_t i = c * chunk; i < (c + 1) * chunk; i++) {
            buf[i] = (i * 0x9E3779B97F4A7C15ull) ^ (i >> 7);
            sum = sum * 31 + buf[i];
        }
        say("fill %llu %016llx %.17g\n", c, sum, acc);
    }
    for (int r = 0; r < rounds; r++) {
        for (size_t i = r & 7; i < words; i += 4) {
            buf[i] = buf[i] * 6364136223846793005ull + r;
            sum = (sum ^ buf[i]) * 0x100000001b3ull;
            acc += (double)(buf[i] >> 40) * 1e-9;
        }
        say("round %llu %016llx %.17g\n", r, sum, acc);
        if (sleep_ms) {
            struct timespec ts = { sleep_ms / 1000, sleep_ms % 1000 * 1000000 };
            nanosleep(&ts, NULL);
        }
    }
    for (size_t i = 0; i < words; i++)      /* verify pass: every word counts */
        sum = sum * 31 + buf[i];
    say("done %llu %016llx %.17g\n", rounds, sum, acc);
    printf("checksum %016llx %.17g\n", (unsigned long long)sum, acc);
    return 20 + (int)(sum % 200);
}

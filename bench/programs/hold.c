/* The dump/restore target: holds SIZE_MIB of written memory and runs a loop
 * that measures its own longest gap (how long it was stopped).
 *
 *   hold SIZE_MIB [PERIOD_US]
 *
 * Fills SIZE_MIB of anonymous memory with a pattern (no zero pages, nothing
 * compressible), writes 'R' to fd 1, then loops: ppoll(fd 0, PERIOD_US),
 * take CLOCK_MONOTONIC, keep the longest gap between two passes and the sum
 * of gaps over 1 ms. Commands, one byte each on fd 0:
 *   r  reset the gap statistics, answer 'k'
 *   g  answer 32 bytes: max gap ns, sum of gaps > 1 ms (ns), their count,
 *      loop passes since the reset (little-endian u64 each)
 *   a  answer 'A' (the bench times exec -> this byte after a restore)
 *   v  re-read every word of the buffer against the pattern: 'V' if all
 *      match, 'X' if not
 * EOF on fd 0: exit 0. A restored copy has the restore command's fds 0-2.
 */
#define _GNU_SOURCE
#include <poll.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + ts.tv_nsec;
}

static uint64_t pattern(uint64_t i)
{
	uint64_t x = (i + 1) * 0x9E3779B97F4A7C15ull;
	return x ^ (x >> 29) ^ 0x5555555555555555ull;
}

static void say(const void *p, size_t n)
{
	if (write(1, p, n) != (ssize_t)n)
		_exit(101);
}

int main(int argc, char **argv)
{
	if (argc < 2)
		return 100;
	size_t words = (size_t)atol(argv[1]) << 17;
	long period_us = argc > 2 ? atol(argv[2]) : 200;
	uint64_t *buf = mmap(NULL, words * 8, PROT_READ | PROT_WRITE,
			     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (buf == MAP_FAILED)
		return 102;
	for (size_t i = 0; i < words; i++)
		buf[i] = pattern(i);
	say("R", 1);

	uint64_t max_gap = 0, stall = 0, nstall = 0, passes = 0;
	uint64_t last = now_ns();
	for (;;) {
		struct pollfd pfd = { .fd = 0, .events = POLLIN };
		struct timespec ts = { 0, period_us * 1000 };
		int r = ppoll(&pfd, 1, &ts, NULL);
		uint64_t t = now_ns(), gap = t - last;
		last = t;
		passes++;
		if (gap > max_gap)
			max_gap = gap;
		if (gap > 1000000) {
			stall += gap;
			nstall++;
		}
		if (r <= 0 || !(pfd.revents & (POLLIN | POLLHUP | POLLERR)))
			continue;
		char cmd[64];
		ssize_t n = read(0, cmd, sizeof cmd);
		if (n <= 0)
			_exit(0);
		for (ssize_t k = 0; k < n; k++) {
			switch (cmd[k]) {
			case 'r':
				max_gap = stall = nstall = passes = 0;
				last = now_ns();
				say("k", 1);
				break;
			case 'g': {
				uint64_t out[4] = { max_gap, stall, nstall, passes };
				say(out, sizeof out);
				break;
			}
			case 'a':
				say("A", 1);
				break;
			case 'v': {
				uint64_t bad = 0;
				for (size_t i = 0; i < words; i++)
					bad |= buf[i] ^ pattern(i);
				say(bad ? "X" : "V", 1);
				break;
			}
			}
		}
		last = now_ns();     /* time spent answering is not a stop */
	}
}

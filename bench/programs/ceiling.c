/* The machine's own ceilings, timed inside one process (no start-up):
 *
 *   ceiling write SIZE_MIB CHUNK_KIB PATH   write SIZE_MIB of already-written
 *                                           memory to a new file PATH
 *                                           (open+write+close). An old PATH
 *                                           is unlinked after the buffer is
 *                                           filled, just before the clock
 *                                           starts: the write then finds as
 *                                           much just-freed memory as a dump
 *                                           that replaces its old image.
 *   ceiling splice SIZE_MIB CHUNK_KIB PATH  the same as write, but zero-copy
 *                                           from the process: vmsplice the
 *                                           memory into a pipe of CHUNK_KIB
 *                                           and splice that to PATH (what a
 *                                           dumper that never touches the
 *                                           data, like CRIU's, can do at best)
 *   ceiling pipe  SIZE_MIB CHUNK_KIB        the same to fd 1 (a pipe)
 *   ceiling touch SIZE_MIB                  first touch (one store per page)
 *                                           of SIZE_MIB of fresh anonymous
 *                                           memory (mmap + page faults)
 *   ceiling memset SIZE_MIB                 memset of SIZE_MIB fresh memory
 *
 * Prints the nanoseconds of the timed part: on fd 1, or on fd 2 for
 * `pipe` (whose fd 1 is the pipe). Buffers are filled before timing.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + ts.tv_nsec;
}

static uint64_t *filled(size_t bytes)
{
	uint64_t *buf = mmap(NULL, bytes, PROT_READ | PROT_WRITE,
			     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (buf == MAP_FAILED)
		exit(102);
	for (size_t i = 0; i < bytes / 8; i++)
		buf[i] = (i + 1) * 0x9E3779B97F4A7C15ull;
	return buf;
}

/* vmsplice [p, p + bytes) into a pipe of `chunk` bytes, splice it to fd. */
static void splice_all(int fd, char *p, size_t bytes, size_t chunk)
{
	int pfd[2];

	if (pipe(pfd) || fcntl(pfd[1], F_SETPIPE_SZ, (int)chunk) < 0)
		exit(105);
	while (bytes) {
		struct iovec v = { p, bytes < chunk ? bytes : chunk };
		ssize_t n = vmsplice(pfd[1], &v, 1, 0);
		if (n <= 0)
			exit(106);
		p += n;
		bytes -= n;
		while (n) {
			ssize_t k = splice(pfd[0], NULL, fd, NULL, n, 0);
			if (k <= 0)
				exit(107);
			n -= k;
		}
	}
	close(pfd[0]);
	close(pfd[1]);
}

static void write_all(int fd, const char *p, size_t bytes, size_t chunk)
{
	while (bytes) {
		ssize_t n = write(fd, p, bytes < chunk ? bytes : chunk);
		if (n <= 0)
			exit(103);
		p += n;
		bytes -= n;
	}
}

int main(int argc, char **argv)
{
	if (argc < 3)
		return 100;
	size_t bytes = (size_t)atol(argv[2]) << 20;
	uint64_t t0, t1;

	if ((!strcmp(argv[1], "write") || !strcmp(argv[1], "splice")) && argc == 5) {
		size_t chunk = (size_t)atol(argv[3]) << 10;
		char *buf = (char *)filled(bytes);
		unlink(argv[4]);
		t0 = now_ns();
		int fd = open(argv[4], O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
		if (fd < 0)
			return 104;
		if (argv[1][0] == 'w')
			write_all(fd, buf, bytes, chunk);
		else
			splice_all(fd, buf, bytes, chunk);
		close(fd);
		t1 = now_ns();
		printf("%llu\n", (unsigned long long)(t1 - t0));
	} else if (!strcmp(argv[1], "pipe") && argc == 4) {
		size_t chunk = (size_t)atol(argv[3]) << 10;
		char *buf = (char *)filled(bytes);
		t0 = now_ns();
		write_all(1, buf, bytes, chunk);
		t1 = now_ns();
		fprintf(stderr, "%llu\n", (unsigned long long)(t1 - t0));
	} else if (!strcmp(argv[1], "touch") || !strcmp(argv[1], "memset")) {
		t0 = now_ns();
		volatile char *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE,
					MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (p == MAP_FAILED)
			return 102;
		if (argv[1][0] == 't')
			for (size_t i = 0; i < bytes; i += 4096)
				p[i] = 1;
		else
			memset((char *)p, 1, bytes);
		t1 = now_ns();
		printf("%llu\n", (unsigned long long)(t1 - t0));
	} else {
		return 100;
	}
	return 0;
}

/* Memory of each kind the dumper's page scan must tell apart, checked after
 * a restore.
 *
 *   zeropages FILE FLAG
 *
 * FILE is at least 16 pages whose byte at offset o is (o * 7 + 3) & 0xff.
 * Maps (anonymous, private):
 *   A  1024 pages, all written (a pattern)
 *   Z  1024 pages, only read: every one is the shared zero page
 *   H  1024 pages: page i written if i % 3 == 0, read if i % 3 == 1, else
 *      never touched
 *   N  64 pages written, then PROT_NONE (unreadable without forcing)
 * and FILE, MAP_PRIVATE, 16 pages: pages 0 and 2 written (private copies),
 * 1 and 3 read.
 * Prints "ready A Z H N F" (hex addresses) and polls every 10 ms until FLAG
 * exists; then checks every page, writes to Z, prints "ok" and exits 0, or
 * prints "bad <region> <page>" and exits 1.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096
#define NPAGES 1024
#define NNONE 64
#define NFILE 16

static uint64_t pattern(uint64_t tag, uint64_t i)
{
	uint64_t x = (i + 1) * 0x9E3779B97F4A7C15ull ^ tag;
	return x ^ (x >> 29);
}

static void fill(uint64_t *p, uint64_t tag, size_t page)
{
	for (size_t w = 0; w < PAGE / 8; w++)
		p[page * PAGE / 8 + w] = pattern(tag, page * PAGE / 8 + w);
}

static int same(const uint64_t *p, uint64_t tag, size_t page)
{
	for (size_t w = 0; w < PAGE / 8; w++)
		if (p[page * PAGE / 8 + w] != pattern(tag, page * PAGE / 8 + w))
			return 0;
	return 1;
}

static int zero(const uint64_t *p, size_t page)
{
	for (size_t w = 0; w < PAGE / 8; w++)
		if (p[page * PAGE / 8 + w])
			return 0;
	return 1;
}

static int file_page(const unsigned char *p, size_t page)
{
	for (size_t o = page * PAGE; o < (page + 1) * PAGE; o++)
		if (p[o] != (unsigned char)(o * 7 + 3))
			return 0;
	return 1;
}

static void *anon(size_t pages)
{
	void *p = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	return p == MAP_FAILED ? NULL : p;
}

static int bad(const char *region, size_t page)
{
	printf("bad %s %zu\n", region, page);
	return 1;
}

int main(int argc, char **argv)
{
	if (argc < 3)
		return 100;
	int fd = open(argv[1], O_RDONLY);
	uint64_t *a = anon(NPAGES), *z = anon(NPAGES), *h = anon(NPAGES),
		 *n = anon(NNONE);
	unsigned char *f = mmap(NULL, NFILE * PAGE, PROT_READ | PROT_WRITE,
				MAP_PRIVATE, fd, 0);
	if (fd < 0 || !a || !z || !h || !n || f == MAP_FAILED)
		return 101;
	close(fd);
	volatile uint64_t sink = 0;
	for (size_t i = 0; i < NPAGES; i++) {
		fill(a, 1, i);
		sink += z[i * PAGE / 8];
		if (i % 3 == 0)
			fill(h, 2, i);
		else if (i % 3 == 1)
			sink += h[i * PAGE / 8];
	}
	for (size_t i = 0; i < NNONE; i++)
		fill(n, 3, i);
	if (mprotect(n, NNONE * PAGE, PROT_NONE))
		return 102;
	f[0 * PAGE + 5] = 0xAA;
	f[2 * PAGE + 9] = 0xBB;
	sink += f[1 * PAGE] + f[3 * PAGE];
	printf("ready %lx %lx %lx %lx %lx\n", (unsigned long)a, (unsigned long)z,
	       (unsigned long)h, (unsigned long)n, (unsigned long)f);
	fflush(stdout);

	struct timespec ts = { 0, 10 * 1000 * 1000 };
	while (access(argv[2], F_OK))
		nanosleep(&ts, NULL);

	for (size_t i = 0; i < NPAGES; i++) {
		if (!same(a, 1, i))
			return bad("A", i);
		if (!zero(z, i))
			return bad("Z", i);
		if (i % 3 == 0 ? !same(h, 2, i) : !zero(h, i))
			return bad("H", i);
	}
	if (mprotect(n, NNONE * PAGE, PROT_READ))
		return 103;
	for (size_t i = 0; i < NNONE; i++)
		if (!same(n, 3, i))
			return bad("N", i);
	for (size_t i = 0; i < NFILE; i++) {
		int want = i == 0 ? 0xAA : i == 2 ? 0xBB : -1;
		size_t at = i == 0 ? 5 : 9;
		if (want >= 0 ? f[i * PAGE + at] != want : !file_page(f, i))
			return bad("F", i);
	}
	for (size_t i = 0; i < NPAGES; i++)	/* the zero pages take writes */
		fill(z, 4, i);
	for (size_t i = 0; i < NPAGES; i++)
		if (!same(z, 4, i))
			return bad("Zw", i);
	printf("ok\n");
	fflush(stdout);
	return 0;
}

/* The mapped-restore target: memory with a pattern, checked on demand.
 *
 *   mapmem SIZE_MIB
 *
 * Fills SIZE_MIB of anonymous memory (mmap) and 1 MiB of brk heap with a
 * pattern (no zero pages), writes 'R' to fd 1, then answers one-byte
 * commands read from fd 0:
 *   v  re-read both areas against the pattern: 'V' if intact, else 'X'
 *   w  write the next pattern over both, re-read: 'W' or 'X'
 *   b  grow the heap with sbrk by 4 MiB, fill and check it: 'B' or 'X'
 *   s  use 4 MiB of stack (the stack VMA grows), check it: 'S' or 'X'
 *   d  MADV_DONTNEED the first page of the mmap area, then say what its
 *      first word reads: 'Z' zero, 'I' the pattern (a mapped restore:
 *      the image's bytes come back), '?' anything else
 *   f  fork; the child checks the areas and exits 0 if intact: 'F' or 'X'
 * EOF on fd 0: exit 0.
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

static uint64_t *area, *heap;
static size_t area_words, heap_words = (1 << 20) / 8;
static uint64_t seed = 1;

static uint64_t pattern(uint64_t i, uint64_t s)
{
	uint64_t x = (i + 1) * 0x9E3779B97F4A7C15ull * s;
	return x ^ (x >> 29) ^ 0x5555555555555555ull;
}

static void fill(uint64_t *p, size_t n, uint64_t s)
{
	for (size_t i = 0; i < n; i++)
		p[i] = pattern(i, s);
}

static int intact(const uint64_t *p, size_t n, uint64_t s)
{
	for (size_t i = 0; i < n; i++)
		if (p[i] != pattern(i, s))
			return 0;
	return 1;
}

static int all_intact(void)
{
	return intact(area, area_words, seed) && intact(heap, heap_words, seed + 7);
}

static int deep(int n)
{
	volatile uint64_t buf[8192];             /* 64 KiB per level */

	for (size_t i = 0; i < 8192; i++)
		buf[i] = pattern(i, (uint64_t)n + 100);
	int ok = n ? deep(n - 1) : 1;
	for (size_t i = 0; i < 8192; i++)
		ok &= buf[i] == pattern(i, (uint64_t)n + 100);
	return ok;
}

static void say(char c)
{
	if (write(1, &c, 1) != 1)
		_exit(101);
}

int main(int argc, char **argv)
{
	if (argc < 2)
		return 100;
	area_words = (size_t)atol(argv[1]) << 17;
	area = mmap(NULL, area_words * 8, PROT_READ | PROT_WRITE,
		    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	heap = sbrk(heap_words * 8);
	if (area == MAP_FAILED || heap == (void *)-1)
		return 102;
	fill(area, area_words, seed);
	fill(heap, heap_words, seed + 7);
	say('R');
	for (;;) {
		char c;
		if (read(0, &c, 1) != 1)
			return 0;
		switch (c) {
		case 'v':
			say(all_intact() ? 'V' : 'X');
			break;
		case 'w':
			seed++;
			fill(area, area_words, seed);
			fill(heap, heap_words, seed + 7);
			say(all_intact() ? 'W' : 'X');
			break;
		case 'b': {
			size_t n = (4 << 20) / 8;
			uint64_t *more = sbrk(n * 8);
			if (more == (void *)-1) {
				say('X');
				break;
			}
			fill(more, n, 3);
			say(intact(more, n, 3) && all_intact() ? 'B' : 'X');
			break;
		}
		case 's':
			say(deep(63) ? 'S' : 'X');
			break;
		case 'd': {
			if (madvise(area, 4096, MADV_DONTNEED)) {
				say('?');
				break;
			}
			uint64_t w = area[0];
			say(w == 0 ? 'Z' : w == pattern(0, 1) ? 'I' : '?');
			fill(area, 512, seed);          /* intact again */
			break;
		}
		case 'f': {
			pid_t pid = fork();
			int st;
			if (pid == 0)
				_exit(all_intact() ? 0 : 1);
			say(pid > 0 && waitpid(pid, &st, 0) == pid && WIFEXITED(st) &&
			    WEXITSTATUS(st) == 0 ? 'F' : 'X');
			break;
		}
		default:
			say('?');
		}
	}
}

/* Memory in very many separate runs: the target of mapped restore's
 * fallback (planner._mapped_vmas copies the VMAs with the most runs when
 * mapping every run would pass vm.max_map_count).
 *
 *   sparse CHUNKS
 *
 * Maps CHUNKS areas of 1000 pages of anonymous private memory, one unmapped
 * page before each and after the last (so each is a VMA of its own), with
 * MADV_NOHUGEPAGE (no huge page fills the gaps), and writes a pattern into
 * every other page of each (0, 2, ..., 998); the pages between are never
 * touched, so a dump saves 500 separate runs per area (-DCHUNK=N: areas of
 * N pages, N / 2 runs; more than 512 runs in one VMA is what exposed Linux
 * 6.18's short PAGEMAP_SCAN walk_end to the dumper). Also fills 1 MiB of
 * brk heap with a pattern (saved memory in one run). Writes 'R' to fd 1,
 * then answers one-byte commands read from fd 0:
 *   v  'V' if every written page still holds its pattern, every other page
 *      of the areas reads zero and the heap is intact, else 'X'
 * EOF on fd 0: exit 0.
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#define PAGE 4096
#define WORDS (PAGE / 8)
#ifndef CHUNK
#define CHUNK 1000                      /* pages per area (even) */
#endif
#define STRIDE (CHUNK + 1)              /* an area and the hole before it */

static char *base;
static uint64_t *heap;
static size_t chunks, heap_words = (1 << 20) / 8;

static uint64_t pattern(uint64_t i, uint64_t s)
{
	uint64_t x = (i + 1) * 0x9E3779B97F4A7C15ull * s;
	return x ^ (x >> 29) ^ 0x5555555555555555ull;
}

static uint64_t *page(size_t c, size_t p)
{
	return (uint64_t *)(base + ((c * STRIDE + 1 + p) * PAGE));
}

static int intact(void)
{
	for (size_t c = 0; c < chunks; c++)
		for (size_t p = 0; p < CHUNK; p++) {
			const uint64_t *w = page(c, p);
			uint64_t n = (c * CHUNK + p) * WORDS;
			for (size_t i = 0; i < WORDS; i++)
				if (w[i] != (p % 2 ? 0 : pattern(n + i, 1)))
					return 0;
		}
	for (size_t i = 0; i < heap_words; i++)
		if (heap[i] != pattern(i, 3))
			return 0;
	return 1;
}

static void say(char c)
{
	if (write(1, &c, 1) != 1)
		_exit(101);
}

int main(int argc, char **argv)
{
	if (argc < 2 || (chunks = (size_t)atol(argv[1])) == 0)
		return 100;
	size_t len = (chunks * STRIDE + 1) * PAGE;
	base = mmap(NULL, len, PROT_READ | PROT_WRITE,
		    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	heap = sbrk(heap_words * 8);
	if (base == MAP_FAILED || heap == (void *)-1)
		return 102;
	if (madvise(base, len, MADV_NOHUGEPAGE))
		return 103;
	for (size_t c = 0; c <= chunks; c++)
		if (munmap(base + c * STRIDE * PAGE, PAGE))
			return 104;
	for (size_t c = 0; c < chunks; c++)
		for (size_t p = 0; p < CHUNK; p += 2) {
			uint64_t *w = page(c, p), n = (c * CHUNK + p) * WORDS;
			for (size_t i = 0; i < WORDS; i++)
				w[i] = pattern(n + i, 1);
		}
	for (size_t i = 0; i < heap_words; i++)
		heap[i] = pattern(i, 3);
	say('R');
	for (;;) {
		char c;
		if (read(0, &c, 1) != 1)
			return 0;
		say(c == 'v' ? (intact() ? 'V' : 'X') : '?');
	}
}

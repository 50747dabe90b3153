/*
 * The native launcher: binfmt_misc's interpreter for ckpt images.
 *
 *     ckpt-launcher-native IMAGE [ARGS...]
 *
 * Repeats a restore the Python launcher already did and described in a
 * ticket (ckpt/restore/ticket.py, ticket.h), without Python: it never
 * parses the image (only fstats it), computes the ticket key from the
 * image's identity and the caller's state, reads the caller's own ticket,
 * compares all of the key, opens and checks every file the plan uses as
 * the caller, places its own copy of the stub (the same build: the key
 * holds its SOURCE_HASH) and the ticket's plan where the ticket says, and
 * jumps. On any difference (a miss) it execve()s the Python launcher
 * (this program's path without "-native") with the same argv and
 * environment: nothing printed, nothing changed but fds it opened
 * (O_CLOEXEC: the exec closes them) and an RLIMIT_NOFILE soft limit it
 * raised (put back).
 *
 * Freestanding like the stub (no libc), static, at a fixed address.
 */
#include "plan.h"
#include "sys.h"
#include "ticket.h"
#include "util.h"
#include "stub_info.h"           /* generated: STUB_ENTRY, STUB_RX_SIZE, ... */

#define __NR_lseek        8
#define __NR_execve      59
#define __NR_fcntl       72
#define __NR_fchdir      81
#define __NR_readlink    89
#define __NR_getgroups  115
#define __NR_getresuid  118
#define __NR_getresgid  120
#define __NR_capget     125
#define __NR_fstatfs    138
#define __NR_openat     257
#define __NR_newfstatat 262
#define __NR_fstat        5

#define AT_FDCWD        (-100)
#define O_RDONLY        0
#define O_DIRECTORY     0200000
#define O_NOFOLLOW      0400000
#define O_PATH          010000000
#define F_DUPFD_CLOEXEC 1030
#define S_IFMT          0170000
#define S_IFREG         0100000
#define S_IFDIR         0040000
#define ST_NOEXEC       8
#define ENOENT          2
#define RLIMIT_NOFILE   7
#define AT_SYSINFO_EHDR 33
#define PAGE            4096ULL
#define TASK_TOP        0x7ffffffff000ULL
#define POLICY_PATH     "/etc/ckpt/policy.toml"
#define SUFFIX          "-native"

struct kstat {
	u64 dev, ino, nlink;
	u32 mode, uid, gid, pad0;
	u64 rdev;
	s64 size, blksize, blocks;
	u64 atime, atime_ns, mtime, mtime_ns, ctime, ctime_ns;
	s64 unused[3];
};

struct kstatfs {
	s64 type, bsize;
	u64 blocks, bfree, bavail, files, ffree;
	s32 fsid[2];
	s64 namelen, frsize, flags, spare[4];
};

struct rlim { u64 cur, max; };

extern const unsigned char stub_blob[];

static char **g_argv, **g_envp;
static struct rlim nofile_old;
static int nofile_raised;

static ulong slen(const char *s)
{
	ulong n = 0;

	while (s[n])
		n++;
	return n;
}

static const char *getenv(const char *name)
{
	ulong n = slen(name);
	char **e;

	for (e = g_envp; *e; e++)
		if (!memcmp(*e, name, n) && (*e)[n] == '=')
			return *e + n + 1;
	return 0;
}

static int flag(const char *name)
{
	const char *v = getenv(name);

	return v && v[0] && !(v[0] == '0' && !v[1]);
}

static void say(const char *s)
{
	sys3(__NR_write, 2, (long)s, (long)slen(s));
}

/* Not a hit: run the Python launcher, as if we had never been here. */
__attribute__((noreturn)) static void miss(void)
{
	static char path[4096 + 16];
	long n;

	if (nofile_raised)
		sys4(__NR_prlimit64, 0, RLIMIT_NOFILE, (long)&nofile_old, 0);
	n = sys3(__NR_readlink, (long)"/proc/self/exe", (long)path, 4096);
	if (n <= (long)slen(SUFFIX) || memcmp(path + n - slen(SUFFIX), SUFFIX, slen(SUFFIX))) {
		/* replaced meanwhile ("... (deleted)"): the path binfmt_misc ran */
		n = (long)slen(g_argv[0]);
		if (n < 4096)
			memcpy(path, g_argv[0], (ulong)n + 1);
	}
	if (n > (long)slen(SUFFIX) && n < 4096
	    && !memcmp(path + n - slen(SUFFIX), SUFFIX, slen(SUFFIX))) {
		path[n - slen(SUFFIX)] = 0;
		g_argv[0] = path;
		n = sys3(__NR_execve, (long)path, (long)g_argv, (long)g_envp);
	}
	say("ckpt: the native launcher cannot run the Python launcher (its own "
	    "path without -native)\n");
	sys1(__NR_exit_group, 70);          /* Status.INTERNAL */
	for (;;)
		;
}

#define TRY(cond) do { if (!(cond)) miss(); } while (0)

/* --- the key ------------------------------------------------------------ */

static unsigned char key[8192];
static ulong klen;

static void put(const void *p, ulong n)
{
	TRY(klen + n <= sizeof(key));
	memcpy(key + klen, p, n);
	klen += n;
}

static void put64(u64 v)
{
	put(&v, 8);
}

static void put_ident(const struct kstat *st)
{
	put64(st->dev);
	put64(st->ino);
	put64((u64)st->size);
	put64(st->mtime * 1000000000ULL + st->mtime_ns);
	put64(st->ctime * 1000000000ULL + st->ctime_ns);
}

static long read_small(const char *path, char *buf, ulong size)
{
	long fd = sys4(__NR_openat, AT_FDCWD, (long)path, O_RDONLY | O_CLOEXEC, 0);
	long n;

	if (is_err(fd))
		return fd;
	n = sys3(__NR_read, fd, (long)buf, (long)size);
	sys1(__NR_close, fd);
	return n;
}

/* Python's int() of the file's text; 0 if unreadable (as ticket._sysctl). */
static u64 sysctl(const char *path)
{
	char buf[64];
	long n = read_small(path, buf, sizeof(buf));
	long i = 0;
	u64 v = 0;

	if (n <= 0)
		return 0;
	while (i < n && (buf[i] == ' ' || buf[i] == '\t'))
		i++;
	if (i == n || buf[i] < '0' || buf[i] > '9')
		return 0;
	for (; i < n && buf[i] >= '0' && buf[i] <= '9'; i++)
		v = v * 10 + (u64)(buf[i] - '0');
	for (; i < n; i++)
		if (buf[i] != '\n' && buf[i] != ' ' && buf[i] != '\t')
			return 0;
	return v;
}

static void build_key(const struct kstat *image)
{
	char boot[64];
	struct kstat st;
	u32 ids[3], groups[TICKET_MAX_GROUPS];
	struct { u32 version; s32 pid; } caphdr = { 0x20080522, 0 };
	struct { u32 eff, perm, inh; } cap[2];
	struct rlim rl;
	long n, i;
	u64 opts;

	put(STUB_SOURCE_HASH, 64);
	n = read_small("/proc/sys/kernel/random/boot_id", boot, sizeof(boot));
	TRY(n >= 36 && (n == 36 || boot[36] == '\n'));
	memset(boot + 36, 0, 4);
	put(boot, 40);
	put_ident(image);

	n = sys4(__NR_newfstatat, AT_FDCWD, (long)POLICY_PATH, (long)&st, 0);
	if (n == -ENOENT) {
		for (i = 0; i < 6; i++)
			put64(0);
	} else {
		TRY(!is_err(n));
		put64(1);
		put_ident(&st);
	}
	opts = (flag("CKPT_AS_CALLER") ? TO_AS_CALLER : 0)
		| (flag("CKPT_RESTORE_CREDS") ? TO_RESTORE_CREDS : 0)
		| (flag("CKPT_MAPPED") ? TO_MAPPED : 0);
	{
		const char *v = getenv("CKPT_NEW_TIDS");
		if (v && v[0] == '1' && !v[1])
			opts |= TO_NEW_TIDS;
	}
	put64(opts);
	TRY(!is_err(sys3(__NR_getresuid, (long)&ids[0], (long)&ids[1], (long)&ids[2])));
	for (i = 0; i < 3; i++)
		put64(ids[i]);
	TRY(!is_err(sys3(__NR_getresgid, (long)&ids[0], (long)&ids[1], (long)&ids[2])));
	for (i = 0; i < 3; i++)
		put64(ids[i]);
	TRY(!is_err(sys2(__NR_capget, (long)&caphdr, (long)cap)));
	put64(cap[0].eff | (u64)cap[1].eff << 32);
	for (i = 0; i < 16; i++) {
		TRY(!is_err(sys4(__NR_prlimit64, 0, i, 0, (long)&rl)));
		put64(rl.cur);
		put64(rl.max);
	}
	put64(sysctl("/proc/sys/vm/max_map_count"));
	put64(sysctl("/proc/sys/vm/mmap_min_addr"));
	n = sys2(__NR_getgroups, TICKET_MAX_GROUPS, (long)groups);
	TRY(!is_err(n));
	put64((u64)n);
	for (i = 0; i < n; i++)
		put64(groups[i]);
}

/* The [vvar]..[vdso] block from /proc/self/maps (the vdso's offset in it
   depends on the kernel: checked, not assumed). */
static int vdso_block(u64 *lo, u64 *len)
{
	static char buf[16384];
	long fd = sys4(__NR_openat, AT_FDCWD, (long)"/proc/self/maps", O_RDONLY | O_CLOEXEC, 0);
	long n, got = 0, i, line = 0;
	u64 b0 = 0, b1 = 0;

	if (is_err(fd))
		return 0;
	while ((n = sys3(__NR_read, fd, (long)(buf + got), (long)(sizeof(buf) - 1 - got))) > 0)
		got += n;
	sys1(__NR_close, fd);
	if (n < 0 || got >= (long)sizeof(buf) - 1)
		return 0;
	for (i = 0; i < got; i++) {
		if (buf[i] != '\n')
			continue;
		{
			const char *l = buf + line, *e = buf + i;
			u64 a = 0, z = 0;
			int special = (e - l > 6 && !memcmp(e - 6, "[vvar]", 6))
				|| (e - l > 13 && !memcmp(e - 13, "[vvar_vclock]", 13))
				|| (e - l > 6 && !memcmp(e - 6, "[vdso]", 6));
			line = i + 1;
			if (!special)
				continue;
			for (; l < e && *l != '-'; l++)
				a = a * 16 + (u64)(*l <= '9' ? *l - '0' : *l - 'a' + 10);
			for (l++; l < e && *l != ' '; l++)
				z = z * 16 + (u64)(*l <= '9' ? *l - '0' : *l - 'a' + 10);
			if (!b1)
				b0 = a;
			else if (a != b1)
				return 0;           /* not contiguous */
			b1 = z;
		}
	}
	*lo = b0;
	*len = b1 - b0;
	return b1 > b0;
}

static u64 fnv1a64(const unsigned char *p, ulong n)
{
	u64 h = 0xcbf29ce484222325ULL;

	while (n--)
		h = (h ^ *p++) * 0x100000001b3ULL;
	return h;
}

/* --- the ticket --------------------------------------------------------- */

static char dirpath[4096];

static void cat(ulong *at, const char *s)
{
	ulong n = slen(s);

	TRY(*at + n < sizeof(dirpath));
	memcpy(dirpath + *at, s, n);
	*at += n;
	dirpath[*at] = 0;
}

/* The tickets directory, open (O_PATH): the caller's, 0700. */
static long open_ticket_dir(u32 euid)
{
	const char *xdg = getenv("XDG_CACHE_HOME"), *home = getenv("HOME");
	struct kstat st;
	ulong at = 0;
	long fd;

	if (xdg && xdg[0] == '/') {
		cat(&at, xdg);
	} else {
		TRY(home && home[0] == '/');
		cat(&at, home);
		while (at > 1 && dirpath[at - 1] == '/')
			dirpath[--at] = 0;
		cat(&at, "/.cache");
	}
	cat(&at, "/ckpt/tickets");
	fd = sys4(__NR_openat, AT_FDCWD, (long)dirpath,
		  O_PATH | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC, 0);
	TRY(!is_err(fd));
	TRY(!is_err(sys2(__NR_fstat, fd, (long)&st)));
	TRY((st.mode & S_IFMT) == S_IFDIR && st.uid == euid && !(st.mode & 077));
	return fd;
}

struct body {
	u64 stub_start, stub_len, plan_off, plan_len, vdso_len, vdso_off;
	u64 nofile_need, cwd_len, nfiles;
};

struct file_ent {
	u64 fd, flags, pos, how, ident[5], path_len;
};

static int staged_src[TICKET_MAX_FILES], staged_dst[TICKET_MAX_FILES];

static int same_ident(const struct kstat *st, const u64 *id)
{
	return st->dev == id[0] && st->ino == id[1] && (u64)st->size == id[2]
		&& st->mtime * 1000000000ULL + st->mtime_ns == id[3]
		&& st->ctime * 1000000000ULL + st->ctime_ns == id[4];
}

__attribute__((noreturn, used)) void launcher_main(long *sp)
{
	long argc = sp[0], fd, img, tfd, dfd, cwdfd, n;
	u64 *auxv, vdso_ehdr = 0, start, i, pos, size, max_fd, base;
	struct kstat st, ist;
	struct kstatfs sfs;
	const unsigned char *t;
	const struct body *b;
	const char *cwd;
	struct plan_header *P;
	struct rlim rl;
	char name[24];
	u32 ids[3];

	g_argv = (char **)(sp + 1);
	g_envp = g_argv + argc + 1;
	for (auxv = (u64 *)g_envp; *auxv; auxv++)
		;
	for (auxv++; auxv[0]; auxv += 2)
		if (auxv[0] == AT_SYSINFO_EHDR)
			vdso_ehdr = auxv[1];

	TRY(argc >= 2 && vdso_ehdr);
	TRY(!flag("CKPT_NO_TICKETS"));
	{
		const char *pol = getenv("CKPT_POLICY");
		TRY(!pol || !pol[0]);
	}
	img = sys4(__NR_openat, AT_FDCWD, (long)g_argv[1], O_RDONLY | O_CLOEXEC, 0);
	TRY(!is_err(img));
	TRY(!is_err(sys2(__NR_fstat, img, (long)&ist)));
	TRY((ist.mode & S_IFMT) == S_IFREG);
	build_key(&ist);

	TRY(!is_err(sys3(__NR_getresuid, (long)&ids[0], (long)&ids[1], (long)&ids[2])));
	dfd = open_ticket_dir(ids[1]);
	{
		u64 h = fnv1a64(key, klen);
		for (i = 0; i < 16; i++)
			name[i] = "0123456789abcdef"[(h >> (60 - 4 * i)) & 15];
		memcpy(name + 16, ".tk", 4);
	}
	tfd = sys4(__NR_openat, dfd, (long)name, O_RDONLY | O_NOFOLLOW | O_CLOEXEC, 0);
	TRY(!is_err(tfd));
	TRY(!is_err(sys2(__NR_fstat, tfd, (long)&st)));
	size = (u64)st.size;
	TRY((st.mode & S_IFMT) == S_IFREG && st.uid == ids[1] && !(st.mode & 077)
	    && size >= 32 + klen + sizeof(struct body) && size <= TICKET_MAX_SIZE
	    && !(size % 8));
	n = sys6(__NR_mmap, 0, (long)size, PROT_READ, MAP_PRIVATE, tfd, 0);
	TRY(!is_err(n));
	t = (const unsigned char *)n;
	TRY(!memcmp(t, TICKET_MAGIC, 8) && ((const u64 *)t)[1] == TICKET_VERSION
	    && ((const u64 *)t)[2] == size && ((const u64 *)t)[3] == klen
	    && !memcmp(t + 32, key, klen));

	/* The body: every length checked against the file's size. */
	pos = 32 + klen;
	b = (const struct body *)(t + pos);
	pos += sizeof(*b);
	TRY(b->cwd_len && b->cwd_len % 8 == 0 && b->cwd_len <= 4096 && pos + b->cwd_len <= size);
	cwd = (const char *)(t + pos);
	TRY(cwd[b->cwd_len - 1] == 0);
	pos += b->cwd_len;
	TRY(b->nfiles <= TICKET_MAX_FILES);
	{
		u64 p = pos;
		for (i = 0; i < b->nfiles; i++) {
			const struct file_ent *f = (const void *)(t + p);
			TRY(p + sizeof(*f) <= size);
			TRY(f->path_len && f->path_len % 8 == 0 && f->path_len <= 4096
			    && p + sizeof(*f) + f->path_len <= size);
			TRY(((const char *)(f + 1))[f->path_len - 1] == 0);
			p += sizeof(*f) + f->path_len;
		}
		TRY(p + b->plan_len == size);
	}
	start = b->stub_start;
	TRY(!(start % PAGE) && !(b->stub_len % PAGE) && start >= PAGE
	    && b->stub_len <= TASK_TOP && start <= TASK_TOP - b->stub_len);
	TRY(b->plan_off >= ((STUB_MEM_SIZE + PAGE - 1) & ~(PAGE - 1)) && !(b->plan_off % PAGE)
	    && b->plan_len >= sizeof(struct plan_header) && b->plan_len <= b->stub_len
	    && b->plan_off <= b->stub_len - b->plan_len);
	P = (struct plan_header *)(t + size - b->plan_len);
	TRY(P->magic == PLAN_MAGIC && P->version == PLAN_VERSION
	    && P->plan_size <= b->plan_len && P->stub_start == start
	    && P->stub_len == b->stub_len && P->vdso_len == b->vdso_len && P->vdso_dst
	    && b->vdso_len && b->vdso_off < b->vdso_len && vdso_ehdr >= b->vdso_off);

	{
		u64 lo, len;
		TRY(vdso_block(&lo, &len) && len == b->vdso_len && lo == vdso_ehdr - b->vdso_off);
	}

	/* Mapped restore: the file system may have been remounted noexec. */
	if (flag("CKPT_MAPPED")) {
		TRY(!is_err(sys2(__NR_fstatfs, img, (long)&sfs)));
		TRY(!(sfs.flags & ST_NOEXEC));
	}

	/* The open-file limit restore needs (as restore.check_host). */
	TRY(!is_err(sys4(__NR_prlimit64, 0, RLIMIT_NOFILE, 0, (long)&nofile_old)));
	if (nofile_old.cur < b->nofile_need) {
		TRY(nofile_old.max >= b->nofile_need);
		rl.cur = b->nofile_need;
		rl.max = nofile_old.max;
		nofile_raised = 1;
		TRY(!is_err(sys4(__NR_prlimit64, 0, RLIMIT_NOFILE, (long)&rl, 0)));
	}

	/* Open and check the files as the caller; stage them above every fd
	   number the plan uses. */
	max_fd = P->image_fd;
	pos = 32 + klen + sizeof(*b) + b->cwd_len;
	for (i = 0; i < b->nfiles; i++) {
		const struct file_ent *f = (const void *)(t + pos);
		if (f->fd > max_fd)
			max_fd = f->fd;
		pos += sizeof(*f) + f->path_len;
	}
	TRY(max_fd < (1U << 30) && P->fd_base <= max_fd + 1);
	base = max_fd + 1;
	fd = sys3(__NR_fcntl, img, F_DUPFD_CLOEXEC, (long)base);
	TRY(!is_err(fd));
	staged_src[0] = (int)fd;
	staged_dst[0] = (int)P->image_fd;
	pos = 32 + klen + sizeof(*b) + b->cwd_len;
	for (i = 0; i < b->nfiles; i++) {
		const struct file_ent *f = (const void *)(t + pos);
		const char *path = (const char *)(f + 1);
		pos += sizeof(*f) + f->path_len;
		TRY(f->fd >= P->fd_base && f->fd != P->image_fd);
		fd = sys4(__NR_openat, AT_FDCWD, (long)path, (long)(f->flags | O_CLOEXEC), 0);
		TRY(!is_err(fd));
		TRY(!is_err(sys2(__NR_fstat, fd, (long)&st)));
		switch (f->how) {
		case TF_IDENTITY:
			TRY((st.mode & S_IFMT) == S_IFREG && same_ident(&st, f->ident));
			break;
		case TF_SIZE:
			TRY((st.mode & S_IFMT) == S_IFREG && (u64)st.size == f->ident[2]);
			break;
		case TF_MIN_SIZE:
			TRY((u64)st.size >= f->pos);
			break;
		case TF_OPENS:
			break;
		default:
			miss();
		}
		if (f->pos)
			TRY(sys3(__NR_lseek, fd, (long)f->pos, 0) == (long)f->pos);
		n = sys3(__NR_fcntl, fd, F_DUPFD_CLOEXEC, (long)base);
		TRY(!is_err(n));
		sys1(__NR_close, fd);
		staged_src[i + 1] = (int)n;
		staged_dst[i + 1] = (int)f->fd;
	}
	cwdfd = sys4(__NR_openat, AT_FDCWD, (long)cwd, O_PATH | O_DIRECTORY | O_CLOEXEC, 0);
	TRY(!is_err(cwdfd));

	/* The stub region, where the ticket says (free in the image's layout;
	   MAP_FIXED_NOREPLACE: free in ours). */
	n = sys6(__NR_mmap, (long)start, (long)b->stub_len, PROT_READ | PROT_WRITE,
		 MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
	TRY(n == (long)start);
	if (is_err(sys1(__NR_fchdir, cwdfd))) {
		sys2(__NR_munmap, (long)start, (long)b->stub_len);
		miss();
	}

	/* A hit: from here on nothing fails before the stub. */
	memcpy((void *)start, stub_blob, STUB_BLOB_SIZE);
	memcpy((void *)(start + b->plan_off), P, b->plan_len);
	P = (struct plan_header *)(start + b->plan_off);
	P->cur_rseq_addr = 0;          /* no libc, no rseq registration */
	P->cur_rseq_len = 0;
	P->cur_rseq_sig = 0;
	P->vdso_cur = vdso_ehdr - b->vdso_off;
	sys3(__NR_mprotect, (long)start, STUB_RX_SIZE, PROT_READ | PROT_EXEC);
	sys1(__NR_close, cwdfd);
	sys1(__NR_close, tfd);
	sys1(__NR_close, dfd);
	sys1(__NR_close, img);
	for (i = 0; i <= b->nfiles; i++)
		sys3(__NR_dup3, staged_src[i], staged_dst[i], O_CLOEXEC);
	((void (*)(const void *))(start + STUB_ENTRY))(P);
	fail("native launcher: the restorer returned", NOADDR, 0);
}

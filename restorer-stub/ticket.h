/*
 * Restore tickets (ckpt/restore/ticket.py writes them, launcher.c reads
 * them; the two must agree). All integers u64 little-endian.
 *
 *   "CKPTTIK1" | version | file size | key size | key | body
 *
 * key:  char source_hash[64]  the stub's SOURCE_HASH (hex)
 *       char boot_id[40]      36 characters, NUL padded
 *       image[5]              st_dev, st_ino, st_size, mtime ns, ctime ns
 *       policy[6]             present, then its 5 as above (0s: absent)
 *       options               TO_* below
 *       uids[3], gids[3]      getresuid, getresgid
 *       cap_eff
 *       rlimits[16][2]        soft, hard for resources 0..15
 *       max_map_count, mmap_min_addr
 *       ngroups, groups[ngroups]
 * body: stub_start, stub_len, plan_off, plan_len, vdso_len, vdso_off,
 *       nofile_need, cwd_len, nfiles,
 *       cwd (cwd_len bytes, NUL terminated and padded to 8),
 *       nfiles x { fd, flags, pos, how, ident[5], path_len, path (NUL
 *                  terminated, padded to 8) },
 *       plan (plan_len bytes)
 */
#ifndef CKPT_TICKET_H
#define CKPT_TICKET_H

#define TICKET_MAGIC   "CKPTTIK1"              /* the first 8 bytes */
#define TICKET_VERSION 1

#define TO_AS_CALLER     1
#define TO_RESTORE_CREDS 2
#define TO_MAPPED        4
#define TO_NEW_TIDS      8

#define TF_IDENTITY 0   /* regular; same dev, ino, size, mtime, ctime */
#define TF_SIZE     1   /* regular; same size */
#define TF_OPENS    2   /* opens */
#define TF_MIN_SIZE 3   /* size >= pos */

#define TICKET_MAX_SIZE  (64ULL << 20)
#define TICKET_MAX_FILES 4096
#define TICKET_MAX_GROUPS 64

#endif
